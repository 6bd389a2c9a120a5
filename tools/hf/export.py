"""``haina export hf``: a DCP checkpoint of any parallel layout -> safetensors + config + tokenizer files.

The model is read whole in one process by :func:`haina.core.model_loading.load_model` (DCP stores every
tensor under its full-model name and global shape whatever the layout that saved it), so no process group
or torchrun is needed, however the run was trained; a DeepSpeed run's checkpoint exports the same way.
A Baichuan-layout directory carries its own model code, so transformers loads it with
``trust_remote_code=True``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from haina.core import hf_layout
from haina.core.config import HainaConfig
from haina.core.hf_layout import HFFormatError
from haina.core.model_loading import load_model
from haina.tools.hf import remote_code

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    _check_options(fmt, dtype)
    cfg, model = load_model(checkpoint, config=config)
    return save_hf(model, cfg, out, fmt, dtype=dtype, tokenizer=tokenizer)


def save_hf(
    model: nn.Module,
    cfg: HainaConfig,
    out: str | Path,
    fmt: str = "llama",
    *,
    dtype: str = "float32",
    tokenizer: str | None = None,
) -> Path:
    """Write the HF model directory ``out`` for a whole (unsharded) haina model in memory; returns ``out``.

    A ``baichuan`` directory also gets its own ``configuration_/modeling_/tokenization_baichuan.py``
    (:mod:`haina.tools.hf.remote_code`), which its config's ``auto_map`` names, so transformers loads it with
    ``trust_remote_code=True`` and no haina installed.
    """
    _check_options(fmt, dtype)
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
    if fmt == "baichuan":
        remote_code.copy_to(out)
    return out


def _check_options(fmt: str, dtype: str) -> None:
    hf_layout.check_format(fmt)
    if dtype not in DTYPES:
        raise HFFormatError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
