"""The ``verifier`` reward: a Python function that checks a response, named as ``module:function``.

Called once per row with keyword arguments: ``prompt`` (the last user turn), ``response`` (the decoded
reply) and the prompt record's other fields (``answer``, ``category``, ...), as TRL passes dataset
columns to its reward functions. A function that declares ``**kwargs`` gets every field; one that does
not gets only the ones it names, so ``def exact(response, answer): ...`` works as is. It returns a
number (a bool counts as 0/1). With ``batched: true`` it is called once per batch with lists instead
(``prompts``, ``responses`` and each field as a list) and returns a list of numbers.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field, field_validator

from haina.core.config import ConfigError, PluginSettings
from haina.core.errors import HainaError
from haina.core.registry import register
from haina.plugins.rewards.base import Reward, RewardInput

if TYPE_CHECKING:
    from haina.core.config import HainaConfig


class VerifierSettings(PluginSettings):
    """A verifier function."""

    function: str = Field("", description="module:function that scores a response (see haina.plugins.rewards.verifier).")
    batched: bool = Field(False, description="Call it once per batch with lists instead of once per row.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments passed on every call.")

    @field_validator("function")
    @classmethod
    def _module_colon_function(cls, value: str) -> str:
        module, sep, name = value.partition(":")
        if value and (not sep or not module or not name.isidentifier()):
            raise ValueError(f"write it as module:function, got {value!r}")
        return value


def load_function(spec: str, where: str = "function") -> Callable[..., Any]:
    """The callable ``module:function`` names; a one-line ConfigError at ``where`` when it cannot be had."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name.isidentifier():
        raise ConfigError(f"{where}: write it as module:function, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any failure to import the user's module is their input's fault
        raise ConfigError(f"{where}: cannot import {module_name!r} ({type(exc).__name__}: {exc})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"{where}: {module_name!r} has no callable {name!r}")
    return fn


def _as_score(value: Any, where: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise HainaError(f"{where} returned {value!r}; a verifier returns a finite number")
    return float(value)


@register("reward", "verifier", settings=VerifierSettings)
class VerifierReward(Reward):
    """Scores from a user's function of prompt text, response text and the record's fields."""

    def __init__(self, settings: VerifierSettings, cfg: HainaConfig) -> None:
        super().__init__(settings, cfg)
        self.fn: Callable[..., Any] | None = None
        self.takes_all = False
        self.accepts: set[str] = set()
        self.required: set[str] = set()

    def check(self) -> None:
        if not self.settings.function:
            raise ConfigError("function: a verifier needs module:function")
        self._load()

    def _load(self) -> Callable[..., Any]:
        if self.fn is None:
            fn = load_function(self.settings.function)
            try:
                params = inspect.signature(fn).parameters.values()
            except (TypeError, ValueError):  # a builtin without a signature: give it everything
                params = ()
                self.takes_all = True
            self.takes_all = self.takes_all or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
            named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            self.accepts = {p.name for p in named}
            self.required = {p.name for p in named if p.default is inspect.Parameter.empty}
            self.fn = fn
        return self.fn

    def _keep(self, args: dict[str, Any]) -> dict[str, Any]:
        missing = sorted(self.required - set(args))
        if missing:
            raise HainaError(
                f"verifier {self.settings.function} needs {', '.join(map(repr, missing))}, which the prompt "
                f"record lacks (it has: {', '.join(sorted(args))})"
            )
        return args if self.takes_all else {k: v for k, v in args.items() if k in self.accepts}

    def score(self, batch: RewardInput) -> torch.Tensor:
        fn, where = self._load(), f"verifier {self.settings.function}"
        extra = self.settings.kwargs
        fields = [{k: v for k, v in item.items() if k not in ("prompt", "response")} for item in batch.items]
        if self.settings.batched:
            keys = sorted({k for f in fields for k in f})
            args = {"prompts": batch.prompts, "responses": batch.responses,
                    **{k: [f.get(k) for f in fields] for k in keys}, **extra}
            values = fn(**self._keep(args))
            if not hasattr(values, "__len__") or len(values) != len(batch):
                raise HainaError(f"{where} (batched) returned {type(values).__name__}, not {len(batch)} scores")
            scores = [_as_score(v, where) for v in values]
        else:
            scores = [
                _as_score(fn(**self._keep({"prompt": p, "response": r, **f, **extra})), where)
                for p, r, f in zip(batch.prompts, batch.responses, fields, strict=True)
            ]
        return torch.tensor(scores, dtype=torch.float32, device=batch.tokens.device)
