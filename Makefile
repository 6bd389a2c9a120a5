# The CPU path: a virtual environment with the torch build pinned in constraints.txt.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint bench-loss bench-dedup bench-quality bench-layouts bench-speed bench-imports clean

setup: $(STAMP)

# PIP_CONSTRAINT (not -c) so the pins also reach build environments: DeepSpeed builds from source
# against torch, which must be the CPU build on disk, not a CUDA download.
$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(PY) -m pip install --quiet -e '.[dev,demo,deepspeed]'
	# DeepSpeed's CPU Adam (used when optimizer states are offloaded) built at install, as DeepSpeed advises for
	# production, rather than JIT-compiled by the first run that offloads (about 40 s on 2 cores, in every new venv)
	$(PY) -m haina.tools.build_ops
	# The local Spark JVM's classes in a class-data-sharing archive (~/.cache/haina), written once by a sample
	# job: every later local session starts about 4 s sooner (haina.data_spark.class_archive says why)
	$(PY) -m haina.data_spark.write_class_archive
	touch $(STAMP)

demo: setup
	$(VENV)/bin/haina demo --workdir runs/demo

# Two xdist workers, one per core; tests/conftest.py makes each test module (or modules sharing an expensive
# session fixture) one unit of work, so no fixture is built twice.
test: setup lint
	$(VENV)/bin/pytest -q -p no:cacheprovider --durations=15 -n 2

# The tier without multi-process, Spark or CLI-training tests (marker `integration`): minutes, not half an hour.
test-fast: setup
	$(VENV)/bin/pytest -q -p no:cacheprovider -m "not integration"

lint: setup
	$(VENV)/bin/ruff check .

bench-loss: setup
	$(PY) -m haina.tools.bench.loss

bench-quality: setup
	$(PY) -m haina.tools.bench.quality

bench-dedup: setup
	$(PY) -m haina.tools.bench.dedup

bench-layouts: setup
	$(PY) -m haina.tools.bench.layouts

bench-speed: setup
	$(PY) -m haina.tools.bench.speed

bench-imports: setup
	$(PY) -m haina.tools.bench.imports

clean:
	rm -rf runs build dist *.egg-info
