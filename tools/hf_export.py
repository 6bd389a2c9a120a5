"""``haina export hf``: a DCP checkpoint of any parallel layout -> safetensors + config + tokenizer files.

DCP stores every tensor under its full-model name and global shape whatever the layout that saved it
(tensor-parallel DTensors, FSDP shards, pipeline stages), so one process can read it straight into a plain,
unsharded model: no process group, no torchrun, however the run was trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from haina.core.checkpoint import load_model_weights, resolve_checkpoint
from haina.core.config import HainaConfig, load_config
from haina.core.model import Transformer
from haina.tools import hf_layout
from haina.tools.hf_layout import HFFormatError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run_config(step_dir: Path, config: str | None = None) -> HainaConfig:
    """The resolved config the run saved (run_dir/config.yaml above checkpoints/step_N), or ``config``."""
    if config is not None:
        return load_config(config)
    for folder in (step_dir, *step_dir.parents[:3]):
        if (folder / "config.yaml").is_file():
            return load_config(str(folder / "config.yaml"))
    raise HFFormatError(f"{step_dir}: no config.yaml in the run directory above it; pass --config")


def empty_model(cfg: HainaConfig) -> Transformer:
    """The model's shape without paying for a random init: meta, then uninitialized CPU memory; derived
    buffers (ALiBi slopes, not checkpointed) are refilled by their module's ``reset_parameters``."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
    model.to_empty(device="cpu")
    for module in model.modules():
        if getattr(module, "_non_persistent_buffers_set", None) and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return model


def load_full_model(
    checkpoint: str | Path, config: str | None = None, prefix: str = ""
) -> tuple[HainaConfig, Transformer, Path]:
    """(config, full fp32 model in eval mode, step dir) of a run or step directory; ``prefix`` picks a
    sub-model of the checkpoint (``actor.`` of a PPO run)."""
    step_dir = resolve_checkpoint(checkpoint)
    cfg = run_config(step_dir, config)
    if cfg.model.head == "value":
        raise HFFormatError(f"{step_dir}: a value-head model (reward model or critic) is not a language model")
    model = empty_model(cfg)
    missing = load_model_weights(step_dir, model, source_prefix=prefix)
    if missing:
        raise HFFormatError(
            f"{step_dir}: no weight {prefix}{missing[0]} of the config's shape in the checkpoint "
            f"({len(missing)} missing; config and checkpoint differ?)"
        )
    return cfg, model.eval(), step_dir


def hf_tensors(model: nn.Module, cfg: HainaConfig, fmt: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's weights in the HF layout ``fmt``, cast to ``dtype``."""
    hf_layout.check_format(fmt)
    if fmt == "llama" and cfg.model.position != "rope":
        raise HFFormatError(f"--format llama needs a RoPE model; this one uses {cfg.model.position!r} (use baichuan)")
    if fmt == "baichuan" and cfg.model.head != "normhead":
        raise HFFormatError(f"--format baichuan needs model.head=normhead (the release normalizes lm_head); got {cfg.model.head!r}")
    if fmt == "baichuan" and cfg.model.position not in ("rope", "alibi"):
        raise HFFormatError(f"--format baichuan supports rope and alibi, not {cfg.model.position!r}")
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return {k: v.to(dtype) for k, v in hf_layout.to_hf(state, cfg.model, fmt).items()}


def export_hf(
    checkpoint: str | Path,
    out: str | Path,
    fmt: str = "llama",
    *,
    dtype: str = "float32",
    config: str | None = None,
    tokenizer: str | None = None,
) -> Path:
    """Write the HF model directory ``out`` from a haina checkpoint; returns ``out``."""
    hf_layout.check_format(fmt)
    if dtype not in DTYPES:
        raise HFFormatError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    cfg, model, _ = load_full_model(checkpoint, config)
    tensors = hf_tensors(model, cfg, fmt, DTYPES[dtype])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    special: dict[str, int] = {}
    sp_model = tokenizer or cfg.data.tokenizer or cfg.align.tokenizer
    if sp_model is not None:
        if not Path(sp_model).is_file():
            raise HFFormatError(f"tokenizer model {sp_model} does not exist (pass --tokenizer)")
        roles = (cfg.tokenizer.user_token, cfg.tokenizer.assistant_token)
        special = hf_layout.write_tokenizer(out, Path(sp_model), fmt, cfg.model.max_seq_len, roles)
    hf_layout.write_weights(out, tensors)
    config_json = hf_layout.hf_config(cfg.model, fmt, DTYPES[dtype], special)
    (out / "config.json").write_text(json.dumps(config_json, indent=2), encoding="utf-8")
    return out
