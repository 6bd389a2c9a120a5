"""``haina import hf``: a Llama or Baichuan 2 model directory -> a haina run directory that training resumes.

The run directory gets what ``haina pretrain`` itself writes: ``config.yaml`` and ``checkpoints/step_0``
(model, a fresh optimizer state and RNG through DCP) with ``checkpoints/latest`` pointing at it. So
``haina pretrain --config RUN/config.yaml data.prefixes=[...]`` continues from the released weights, and
``align.init_from=RUN`` starts fine-tuning from them.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from haina.core import hf_layout
from haina.core.checkpoint import TrainerState, save_checkpoint
from haina.core.config import dump_config
from haina.core.hf_layout import HFFormatError
from haina.core.model_loading import load_hf_model
from haina.core.optim import build_optimizer


def import_hf(
    model_dir: str | Path,
    out: str | Path,
    fmt: str | None = None,
    *,
    base: str | None = None,
    overrides: Sequence[str] = (),
) -> Path:
    """Write the haina run directory ``out`` from an HF model directory; returns the step directory."""
    model_dir, run_dir = Path(model_dir), Path(out)
    if (run_dir / "checkpoints").exists():
        raise HFFormatError(f"{run_dir}: already holds checkpoints; choose a new --out")
    cfg, model = load_hf_model(model_dir, fmt, base=base, overrides=overrides, run_dir=run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if (model_dir / hf_layout.TOKENIZER).is_file():
        shutil.copyfile(model_dir / hf_layout.TOKENIZER, run_dir / hf_layout.TOKENIZER)
    (run_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    model.train()
    optimizer = build_optimizer(model, cfg.optim)
    return save_checkpoint(run_dir / "checkpoints", model, optimizer, TrainerState())
