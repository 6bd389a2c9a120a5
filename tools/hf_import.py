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
from typing import Any

import torch

from haina.core.config import HainaConfig, build_config, dump_config, load_config
from haina.core.model import Transformer
from haina.tools import hf_layout
from haina.tools.hf_export import empty_model
from haina.tools.hf_layout import HFFormatError


def import_config(
    model_dir: Path, fmt: str, hf: dict[str, Any], base: str | None, overrides: Sequence[str], run_dir: Path | None
) -> HainaConfig:
    """``base`` config (file or preset; defaults otherwise) with the model section of the HF config."""
    data = load_config(base, overrides).model_dump(mode="json")
    data["model"].update(hf_layout.model_fields(hf, fmt))
    data["train"]["seq_len"] = min(data["train"]["seq_len"], data["model"]["max_seq_len"])
    if run_dir is not None:
        data["train"]["run_dir"] = str(run_dir)
    if (model_dir / hf_layout.TOKENIZER).is_file():  # the run gets a copy of it; in memory, the export's own
        data["data"]["tokenizer"] = str((run_dir or model_dir) / hf_layout.TOKENIZER)
    return build_config(data)


def load_hf_model(
    model_dir: str | Path,
    fmt: str | None = None,
    *,
    base: str | None = None,
    overrides: Sequence[str] = (),
    run_dir: Path | None = None,
) -> tuple[HainaConfig, Transformer]:
    """(config, fp32 haina model) holding the weights of an HF model directory."""
    model_dir = Path(model_dir)
    hf = hf_layout.read_config(model_dir)
    fmt = hf_layout.check_format(fmt) if fmt else hf_layout.detect_format(model_dir, hf)
    cfg = import_config(model_dir, fmt, hf, base, overrides, run_dir)
    model = empty_model(cfg)
    state = hf_layout.from_hf(hf_layout.read_weights(model_dir), cfg.model, fmt)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise HFFormatError(f"{model_dir}: no weight for {missing[0]} ({len(missing)} missing in all)")
    for name, tensor in state.items():
        if name not in expected:
            raise HFFormatError(f"{model_dir}: weight {name} does not fit a model of this config")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise HFFormatError(
                f"{model_dir}: {name} is {tuple(tensor.shape)}, the config implies {tuple(expected[name].shape)}"
            )
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    return cfg, model.eval()


def import_hf(
    model_dir: str | Path,
    out: str | Path,
    fmt: str | None = None,
    *,
    base: str | None = None,
    overrides: Sequence[str] = (),
) -> Path:
    """Write the haina run directory ``out`` from an HF model directory; returns the step directory."""
    from haina.core.checkpoint import TrainerState, save_checkpoint
    from haina.core.optim import build_optimizer

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
