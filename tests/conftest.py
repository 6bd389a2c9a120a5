"""Shared fixtures: a tiny tokenized dataset and configs small enough for one CPU core."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from haina.core.config import HainaConfig, load_config
from haina.core.errors import HainaError
from tests.data_helpers import cli_runs  # noqa: F401  (a session fixture: the data CLI runs, shared by two modules)

# transformers copies trust_remote_code model files into its module cache: the tests' copies stay out of ~/.cache,
# one folder per xdist worker
os.environ.setdefault("HF_MODULES_CACHE", os.path.join(
    tempfile.gettempdir(), "haina-tests-hf-modules" + os.environ.get("PYTEST_XDIST_WORKER", "")))

EOS = 2

# The suite runs on two xdist workers (`make test`: -n 2). A unit of work is a test module, so a module-scoped
# fixture is built once; modules that share an expensive session fixture are one unit, so it is built once too,
# and so are the two in-tree wheel builds (`python -m build`, the spark-submit launcher's `pip wheel`), which
# share the source tree's build/ folder. Units start heaviest first (measured minutes), so neither worker is
# left with a long one at the end.
SHARED_WORK = {
    "alignment_runs": ("test_alignment", "test_alignment_promises", "test_chat_cli"),
    "cli_runs": ("test_data_cli", "test_data_pipeline", "test_reliability_data", "test_packaging"),
}
HEAVIEST_FIRST = ("test_parallel_engine", "cli_runs", "test_reliability_dist", "alignment_runs", "test_benchmarks",
                  "test_deepspeed", "test_data_ingest_dedup", "test_perplexity", "test_data_bad_records", "test_demo")
_UNIT_OF = {module: unit for unit, modules in SHARED_WORK.items() for module in modules}


def work_unit(nodeid: str) -> str:
    """The unit of work a test belongs to: its module's name, or the shared unit its module is part of."""
    module = Path(nodeid.split("::", 1)[0]).stem
    return _UNIT_OF.get(module, module)


if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers on two cores: one compute thread each, for this process and the processes it starts
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {unit: i for i, unit in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(work_unit(item.nodeid), len(rank)))  # stable: order inside a unit kept


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """xdist's per-scope scheduling with :func:`work_unit` as the scope, in collection order."""
    if config.getvalue("dist") not in ("load", "loadfile", "loadscope"):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class UnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    config.option.loadscopereorder = False  # the order pytest_collection_modifyitems chose
    return UnitScheduling(config, log)


def write_indexed(prefix: Path, documents: list[list[int]]) -> Path:
    """Write documents (each followed by eos) with megatron-core's builder, as `haina data tokenize` does."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for doc in documents:
        builder.add_document(torch.tensor(doc + [EOS], dtype=torch.int64), [len(doc) + 1])
    builder.finalize(str(prefix) + ".idx")
    return prefix


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~40k tokens of documents with learnable structure (repeated n-gram patterns), vocab 512."""
    rng = np.random.default_rng(0)
    patterns = [rng.integers(3, 512, size=int(rng.integers(4, 12))).tolist() for _ in range(40)]
    docs = []
    for _ in range(400):
        doc: list[int] = []
        while len(doc) < int(rng.integers(20, 180)):
            doc += patterns[int(rng.integers(len(patterns)))]
        docs.append(doc)
    return write_indexed(tmp_path_factory.mktemp("data") / "tiny", docs)


@pytest.fixture(scope="session")
def alignment_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tokenizer, the verifiable task's data, and pretrain -> sft -> rm runs of the tiny preset through the
    CLI (one process), shared by every module that starts from them; tests write their own runs elsewhere."""
    from tests.alignment_helpers import make_alignment_data
    from tests.parallel_helpers import run_many

    root = tmp_path_factory.mktemp("align")
    data = make_alignment_data(root / "data")
    pt, sft, rm = root / "pt", root / "pt-sft", root / "pt-sft-rm"
    short = ["train.log_every=1", "train.save_every=100", "optim.warmup_steps=0"]
    run_many([  # one process, the three runs in turn (as `haina pretrain`, `haina sft --from`, `haina rm --from`)
        {"name": "pt", "overrides": [f"train.run_dir={pt}", f"data.prefixes=[{data.pretrain_prefix}]",
                                     f"data.tokenizer={data.tokenizer}", "train.steps=6", *short]},
        {"name": "sft", "algorithm": "sft", "from": str(pt),
         "overrides": [f"train.run_dir={sft}", f"align.data={data.sft}", "train.steps=4", *short]},
        {"name": "rm", "algorithm": "rm", "from": str(sft),
         "overrides": [f"train.run_dir={rm}", f"align.data={data.pairs}", f"align.eval_data={data.eval_pairs}",
                       "train.steps=4", *short]},
    ], 1)
    return {"data": data, "pt": pt, "sft": sft, "rm": rm, "root": root}


def tiny_config(run_dir: Path, data: Path, *overrides: str) -> HainaConfig:
    return load_config(
        "tiny",
        [f"train.run_dir={json.dumps(str(run_dir))}", f"data.prefixes=[{json.dumps(str(data))}]", *overrides],
    )


def one_line_error(func: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    """The message of the bad-input error ``func`` raises: an exception the CLI turns into exit status 2
    (a HainaError), on one line."""
    with pytest.raises(HainaError) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message and "\r" not in message, message
    return message


def install_plugin_package(site: Path, module: str, source: str) -> Path:
    """A throwaway installed distribution under ``site`` whose ``haina.plugins`` entry point imports
    ``module`` (with ``source``): what a third party's pip-installed plugin package looks like."""
    import textwrap

    pkg = site / module
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(source))
    dist = site / f"{module}-0.1.dist-info"
    dist.mkdir()
    name = module.replace("_", "-")
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[haina.plugins]\nacme = {module}\n")
    (dist / "RECORD").write_text("")
    return site
