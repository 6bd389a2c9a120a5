"""Loading a trained model whole, one way for every tool: generation, chat, export, evaluation, collection.

:func:`load_model` takes whatever a user names with ``--checkpoint`` and dispatches on its kind:

- a run directory (its latest checkpoint) or a ``checkpoints/step_N`` directory of the fsdp2 backend,
  saved under any parallel layout: DCP stores every tensor under its full-model name and global shape, so
  one process reads it into a plain, unsharded model (no process group, no torchrun);
- the same of a ``parallel.dp_backend=deepspeed`` run: the ZeRO partitions are joined in this process;
- a Hugging Face model directory (``config.json`` + safetensors or ``.bin``; Llama or Baichuan 2 layout,
  converted by :mod:`haina.core.hf_layout`).

Checkpoint weights are read by :func:`haina.core.checkpoint.load_model_weights`, the one weight reader.
The model comes back in fp32 on the CPU in eval mode; :mod:`haina.core.placement` lays it out on a world.
:func:`haina.core.tokenizer.load_tokenizer` gives the tokenizer that goes with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from haina.core import hf_layout
from haina.core.checkpoint import load_model_weights, resolve_checkpoint
from haina.core.config import HainaConfig, build_config, load_config
from haina.core.errors import InputFileError
from haina.core.hf_layout import HFFormatError
from haina.core.model import Transformer

HF_CONFIG = "config.json"


def run_config(step_dir: Path, config: str | None = None) -> HainaConfig:
    """The resolved config the run saved (run_dir/config.yaml above checkpoints/step_N), or ``config``."""
    if config is not None:
        return load_config(config)
    step_dir = Path(step_dir)
    for folder in (step_dir, *step_dir.parents[:3]):
        if (folder / "config.yaml").is_file():
            return load_config(str(folder / "config.yaml"))
    raise InputFileError(f"{step_dir}: no config.yaml in the run directory above it; pass --config")


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


def is_hf_dir(path: str | Path) -> bool:
    """A Hugging Face model directory (one with config.json), not a haina run."""
    return (Path(path) / HF_CONFIG).is_file()


def hf_run_config(
    model_dir: Path, fmt: str, hf: dict[str, Any], base: str | None = None, overrides: Sequence[str] = (),
    run_dir: Path | None = None,
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
    """(config, fp32 haina model in eval mode) holding the weights of an HF model directory; ``fmt``
    defaults to config.json's model_type, ``run_dir`` is the run the config will describe (an import)."""
    model_dir = Path(model_dir)
    hf = hf_layout.read_config(model_dir)
    fmt = hf_layout.check_format(fmt) if fmt else hf_layout.detect_format(model_dir, hf)
    cfg = hf_run_config(model_dir, fmt, hf, base, overrides, run_dir)
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


def load_checkpoint_model(
    source: str | Path, *, prefix: str = "", config: str | None = None, value_head: bool = False
) -> tuple[HainaConfig, Transformer]:
    """(config, full fp32 model in eval mode) of a haina run or step directory (fsdp2 or DeepSpeed);
    ``prefix`` picks a sub-model of the checkpoint (``actor.`` of a PPO run)."""
    step_dir = resolve_checkpoint(source)
    cfg = run_config(step_dir, config)
    if cfg.model.head == "value" and not value_head:
        raise InputFileError(f"{step_dir}: a value-head model (reward model or critic) is not a language model")
    if value_head:  # a reward model's run config names the LM head it started from; its weights have a value head
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"head": "value"})})
    model = empty_model(cfg)
    missing = load_model_weights(step_dir, model, source_prefix=prefix)
    if missing:
        raise InputFileError(
            f"{step_dir}: no weight {prefix}{missing[0]} of the config's shape in the checkpoint "
            f"({len(missing)} missing; config and checkpoint differ?)"
        )
    return cfg, model.eval()


def load_model(
    source: str | Path, *, prefix: str = "", config: str | None = None, value_head: bool = False
) -> tuple[HainaConfig, Transformer]:
    """(config, full fp32 model in eval mode on the CPU) of any model source: a run directory, a
    ``checkpoints/step_N`` directory (either backend's), or a Hugging Face model directory.

    ``prefix`` picks a sub-model of a haina checkpoint (``actor.`` of a PPO run); ``config`` is the run's
    config when no config.yaml sits above the checkpoint (for an HF directory: the base config its model
    section goes into). Only language models load unless ``value_head`` (a reward model or critic).
    """
    if is_hf_dir(source):
        if prefix:
            raise InputFileError(f"{source}: a Hugging Face model directory has no sub-model {prefix!r}")
        return load_hf_model(source, base=config)
    return load_checkpoint_model(source, prefix=prefix, config=config, value_head=value_head)
