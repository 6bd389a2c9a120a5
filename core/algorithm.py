"""The algorithm contract: what the training loop asks of an algorithm plugin, each hook declared once.

An algorithm plugin subclasses :class:`Algorithm` and is registered as ``@register("algorithm", NAME,
settings=MySettings)``. The loop builds it as ``Algorithm(cfg)``; ``self.settings`` is then its own
settings from the config's ``NAME:`` section. Every hook but :meth:`batches` has a default that does the
ordinary thing, so a plugin overrides only what it changes.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from haina.core import registry
from haina.core.config import HainaConfig, plugin_settings
from haina.core.errors import PluginError
from haina.core.model import build_model
from haina.core.tokenizer import check_tokenizers

if TYPE_CHECKING:
    from haina.core.engine import Engine
    from haina.core.loss import LossOutput


class Algorithm(abc.ABC):
    """Base of algorithm plugins: turns micro-batches into a loss (or owns the whole step)."""

    # names of LossOutput.parts to log; None = the configured loss terms' metrics
    metrics: ClassVar[Sequence[str] | None] = None

    def __init__(self, cfg: HainaConfig) -> None:
        self.cfg = cfg
        self.settings: Any = plugin_settings(cfg, "algorithm", cfg.algorithm)

    @classmethod  # noqa: B027 (an optional hook: does nothing by default)
    def check_config(cls, cfg: HainaConfig) -> None:
        """Refuse layouts or missing inputs in one line (raise ConfigError), before any process starts."""

    def build_model(self, cfg: HainaConfig, device: torch.device) -> nn.Module:
        """The trained module (default: the Transformer of ``cfg.model``). The loop calls this with the
        meta device, cuts the module by the layout and materialises this rank's shards; every module in
        it that holds parameters or buffers must fill them in ``reset_parameters()`` (or be covered by
        an enclosing module's ``init_module``, as the Transformer's are)."""
        return build_model(cfg, device)

    def setup(self, engine: Engine, resumed: bool) -> None:
        """Build frozen models and load starting weights (default: ``align.init_from`` unless resuming)."""
        # DCP only when a run starts: listing or validating plugins must not load the checkpoint machinery
        from haina.core.checkpoint import load_model_weights

        if not resumed and self.cfg.align.init_from is not None:
            for part in engine.parts:
                load_model_weights(self.cfg.align.init_from, part)

    @abc.abstractmethod
    def batches(self, cfg: HainaConfig, run_dir: Path, num_samples: int) -> Any:
        """An object whose ``batch(i)`` is micro-batch ``i`` of the run (the same on every rank)."""

    def loss(self, model: nn.Module, batch: Any) -> LossOutput:
        """The loss of one micro-batch; the default step backpropagates it over the micro-batches.
        A plugin overrides this or :meth:`train_step` (checked by :func:`algorithm_class`)."""
        raise NotImplementedError

    def train_step(self, engine: Engine, step: int, micro_batches: list[Any]) -> dict[str, float]:
        """Own the whole step (rollouts, several updates ...) with the engine's helpers; return metrics
        (``loss`` and any others, ``grad_norm`` optional). Only called when a subclass overrides it."""
        raise NotImplementedError

    def finish(self, engine: Engine, run_dir: Path) -> None:  # noqa: B027 (an optional hook)
        """Work after the last step (evaluation, reports)."""

    # ------------------------------------------------------------------------------- for the loop
    @property
    def owns_step(self) -> bool:
        return type(self).train_step is not Algorithm.train_step

    def metric_names(self, cfg: HainaConfig) -> list[str]:
        if self.metrics is not None:
            return list(self.metrics)
        return [registry.get("loss", name).metric for name in cfg.loss.terms]


def algorithm_class(cfg: HainaConfig) -> type[Algorithm]:
    """The registered algorithm of ``cfg``; a plugin that does not subclass :class:`Algorithm` is refused."""
    cls = registry.get("algorithm", cfg.algorithm)
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        raise PluginError(
            f"algorithm plugin {cfg.algorithm!r} must be a subclass of haina.core.algorithm.Algorithm"
        )
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if cls.loss is Algorithm.loss and cls.train_step is Algorithm.train_step:
        missing.append("loss() or train_step()")
    if missing:
        raise PluginError(f"algorithm plugin {cfg.algorithm!r} ({cls.__module__}) must implement {', '.join(missing)}")
    return cls


def check_algorithm(cfg: HainaConfig) -> None:
    """The refusals every run passes before any process group or model: the tokenizers the config names
    (readable, no more pieces than ``model.vocab_size``), then the algorithm's own (layouts, inputs)."""
    check_tokenizers(cfg)
    algorithm_class(cfg).check_config(cfg)
