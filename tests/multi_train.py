"""Several training runs in one launch: every rank calls ``train`` for each run of a spec in turn, in the one
process group, so a matrix of layouts pays for starting processes, importing torch and joining gloo once
per world size instead of once per layout.

    python -m torch.distributed.run --standalone --nproc-per-node N -m tests.multi_train SPEC.json

SPEC.json: a list of ``{"name", "overrides"}`` with ``"config"`` (a preset or file, default tiny) or, for
an alignment run, ``"algorithm"`` and ``"from"`` (``haina <algorithm> --from RUN``), and ``"faults"`` (the
run's ``HAINA_FAULTS``, none by default); the runs go in order (a resume after the run it resumes). Rank 0 prints ``== run NAME`` before each, so a failure names its run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from haina.core.config import alignment_config, load_config
from haina.core.distributed import close_distributed, end_worker
from haina.core.faults import ENV
from haina.core.train import train


def main(spec: Path) -> None:
    for run in json.loads(spec.read_text()):
        if os.environ.get("RANK", "0") == "0":
            print(f"== run {run['name']}", flush=True)
        os.environ.pop(ENV, None)
        if run.get("faults"):
            os.environ[ENV] = run["faults"]
        if "from" in run:
            cfg = alignment_config(run["algorithm"], run["from"], None, run["overrides"])
        else:
            cfg = load_config(run.get("config", "tiny"), run["overrides"])
        train(cfg)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: no exit-time teardown
        end_worker(0)
    close_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
