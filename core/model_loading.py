"""Loading a trained model, one way for every tool: generation, chat, export, evaluation, collection.

:func:`open_model` takes whatever a user names with ``--checkpoint`` and dispatches on its kind:

- a run directory (its latest checkpoint) or a ``checkpoints/step_N`` directory of the fsdp2 backend,
  saved under any parallel layout: DCP stores every tensor under its full-model name and global shape, so
  any layout reads it, one process included (no process group, no torchrun);
- the same of a ``parallel.dp_backend=deepspeed`` run: the ZeRO partitions are joined in this process;
- a Hugging Face model directory (``config.json`` + safetensors or ``.bin``; Llama or Baichuan 2 layout,
  converted by :mod:`haina.core.hf_layout`).

Checkpoint weights are read by :func:`haina.core.checkpoint.load_model_weights`, the one weight reader.
:func:`open_model` reads only configs and returns a :class:`ModelSource`; its ``fill`` writes the weights
into a model of that config that is whole or any rank's shards of it, one tensor at a time, so
:func:`haina.core.placement.place` builds the model on the meta device, cuts it by the layout and fills
only this rank's shards (no rank holds the whole model), and :func:`load_model` does the same for one
process (fp32, CPU, eval mode). :func:`haina.core.tokenizer.load_tokenizer` gives the tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from haina.core import hf_layout
from haina.core.checkpoint import load_model_weights, resolve_checkpoint
from haina.core.config import HainaConfig, build_config, load_config
from haina.core.errors import InputFileError
from haina.core.hf_layout import HFFormatError
from haina.core.materialize import fill_from_full, materialize
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


@dataclass
class ModelSource:
    """A model to load: the config it was trained with, and how to fill a model of that config, whole
    or any rank's shards of it (a pipeline stage, tensor- and FSDP-sharded), with its weights."""

    cfg: HainaConfig
    fill: Callable[[nn.Module], None]
    where: str

    def load(self, device: str | torch.device = "cpu") -> Transformer:
        """The whole fp32 model in eval mode: built on meta, materialised on ``device``, filled."""
        with torch.device("meta"):
            model = Transformer(self.cfg.model)
        materialize(model, device, None)
        self.fill(model)
        return model.eval()


def _hf_source(
    model_dir: Path, fmt: str | None, base: str | None, overrides: Sequence[str], run_dir: Path | None
) -> ModelSource:
    hf = hf_layout.read_config(model_dir)
    fmt = hf_layout.check_format(fmt) if fmt else hf_layout.detect_format(model_dir, hf)
    cfg = hf_run_config(model_dir, fmt, hf, base, overrides, run_dir)
    readers = hf_layout.from_hf(hf_layout.read_weights(model_dir), fmt)
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in Transformer(cfg.model).state_dict().items()}
    missing = sorted(set(shapes) - set(readers))
    if missing:
        raise HFFormatError(f"{model_dir}: no weight for {missing[0]} ({len(missing)} missing in all)")
    extra = sorted(set(readers) - set(shapes))
    if extra:
        raise HFFormatError(f"{model_dir}: weight {extra[0]} does not fit a model of this config")

    def fill(module: nn.Module) -> None:
        """Each of ``module``'s tensors read alone and cut to this rank's shard (a stage holds some)."""
        for name, target in module.state_dict(keep_vars=True).items():
            tensor = readers[name]()
            if tuple(tensor.shape) != shapes[name]:
                raise HFFormatError(f"{model_dir}: {name} is {tuple(tensor.shape)}, the config implies {shapes[name]}")
            fill_from_full(target, tensor.to(torch.float32))
            del tensor

    return ModelSource(cfg, fill, str(model_dir))


def _checkpoint_source(source: str | Path, prefix: str, config: str | None, value_head: bool) -> ModelSource:
    step_dir = resolve_checkpoint(source)
    cfg = run_config(step_dir, config)
    if cfg.model.head == "value" and not value_head:
        raise InputFileError(f"{step_dir}: a value-head model (reward model or critic) is not a language model")
    if value_head:  # a reward model's run config names the LM head it started from; its weights have a value head
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"head": "value"})})

    def fill(module: nn.Module) -> None:
        missing = load_model_weights(step_dir, module, source_prefix=prefix)
        if missing:
            raise InputFileError(
                f"{step_dir}: no weight {prefix}{missing[0]} of the config's shape in the checkpoint "
                f"({len(missing)} missing; config and checkpoint differ?)"
            )

    return ModelSource(cfg, fill, str(step_dir))


def open_model(
    source: str | Path, *, prefix: str = "", config: str | None = None, value_head: bool = False
) -> ModelSource:
    """The :class:`ModelSource` of any model a user names: a run directory, a ``checkpoints/step_N``
    directory (either backend's), or a Hugging Face model directory. Nothing but configs is read yet.

    ``prefix`` picks a sub-model of a haina checkpoint (``actor.`` of a PPO run); ``config`` is the run's
    config when no config.yaml sits above the checkpoint (for an HF directory: the base config its model
    section goes into). Only language models load unless ``value_head`` (a reward model or critic).
    """
    if is_hf_dir(source):
        if prefix:
            raise InputFileError(f"{source}: a Hugging Face model directory has no sub-model {prefix!r}")
        return _hf_source(Path(source), None, config, (), None)
    return _checkpoint_source(source, prefix, config, value_head)


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
    source = _hf_source(Path(model_dir), fmt, base, overrides, run_dir)
    return source.cfg, source.load()


def load_model(
    source: str | Path, *, prefix: str = "", config: str | None = None, value_head: bool = False
) -> tuple[HainaConfig, Transformer]:
    """(config, full fp32 model in eval mode on the CPU) of any model source (see :func:`open_model`),
    for the one-process tools (chat, export, evaluation); :func:`haina.core.placement.place` loads one
    as this rank's shards instead."""
    opened = open_model(source, prefix=prefix, config=config, value_head=value_head)
    return opened.cfg, opened.load()
