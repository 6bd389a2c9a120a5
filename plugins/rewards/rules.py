"""Rule rewards: ``length`` (an over-length penalty), ``format`` (a regular expression), ``refusal``.

Rules need no model and are exact, so they are cheap terms to add beside a reward model or a verifier:
a small format bonus, a penalty for running past a length budget, a penalty for refusing what should be
answered (and, on red-team prompts, for answering what should be refused).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from haina.core.config import PluginSettings
from haina.core.registry import register
from haina.plugins.rewards.base import Reward, RewardInput

if TYPE_CHECKING:
    from haina.core.config import HainaConfig


def _scores(values: list[float], batch: RewardInput) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=batch.tokens.device)


# ------------------------------------------------------------------------------------------- length

class LengthSettings(PluginSettings):
    """0 up to ``max_length - buffer``, then down linearly to -1 at ``max_length``, -1 past it."""

    max_length: int = Field(512, gt=0, description="Length at which the penalty reaches -1.")
    buffer: int = Field(0, ge=0, description="Length before max_length over which the penalty ramps (DAPO's overlong buffer).")
    unit: Literal["tokens", "chars"] = Field("tokens", description="Count response tokens or characters.")

    @model_validator(mode="after")
    def _buffer_fits(self) -> LengthSettings:
        if self.buffer > self.max_length:
            raise ValueError(f"buffer {self.buffer} exceeds max_length {self.max_length}")
        return self


def length_penalty(length: int, max_length: int, buffer: int) -> float:
    """DAPO's soft over-length punishment: 0, a linear ramp over the buffer, then -1."""
    free = max_length - buffer
    if length <= free:
        return 0.0
    if length > max_length or buffer == 0:
        return -1.0
    return -(length - free) / buffer


@register("reward", "length", settings=LengthSettings)
class LengthReward(Reward):
    def score(self, batch: RewardInput) -> torch.Tensor:
        s = self.settings
        lengths = batch.response_lengths if s.unit == "tokens" else [len(r) for r in batch.responses]
        return _scores([length_penalty(n, s.max_length, s.buffer) for n in lengths], batch)


# ------------------------------------------------------------------------------------------- format

class FormatSettings(PluginSettings):
    """``score`` when the response matches ``pattern``, else ``otherwise``."""

    pattern: str = Field(r"(?s)<think>.+</think>.+", description="Python regular expression.")
    match: Literal["full", "search"] = Field("full", description="The whole response must match, or any part.")
    score: float = Field(1.0, description="Score of a matching response.")
    otherwise: float = Field(0.0, description="Score of any other response.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression ({exc})") from None
        return value


@register("reward", "format", settings=FormatSettings)
class FormatReward(Reward):
    def __init__(self, settings: FormatSettings, cfg: HainaConfig) -> None:
        super().__init__(settings, cfg)
        self.regex = re.compile(settings.pattern)

    def score(self, batch: RewardInput) -> torch.Tensor:
        s = self.settings
        test = self.regex.fullmatch if s.match == "full" else self.regex.search
        return _scores([s.score if test(r.strip()) else s.otherwise for r in batch.responses], batch)


# ------------------------------------------------------------------------------------------ refusal

REFUSAL_PHRASES = (
    "i'm sorry", "i am sorry", "sorry,", "i can't", "i cannot", "i can not", "i won't", "i will not", "as an ai",
    "抱歉", "很抱歉", "对不起", "我不能", "我无法",
)


class RefusalSettings(PluginSettings):
    """-penalty for the wrong behaviour: refusing a prompt that should be answered, or (with refuse_if)
    answering one that should be refused; ``bonus`` for the right one."""

    phrases: list[str] = Field(list(REFUSAL_PHRASES), description="Phrases that mark a refusal (case-insensitive).")
    where: Literal["start", "anywhere"] = Field("start", description="A phrase must open the response, or appear anywhere.")
    refuse_if: str | None = Field(
        None, description="field=value of the prompt record that marks prompts to refuse, e.g. category=safety "
        "(a list field matches its first element; field alone: truthy); none: every prompt should be answered.",
    )
    penalty: float = Field(1.0, ge=0, description="Subtracted for the wrong behaviour.")
    bonus: float = Field(0.0, ge=0, description="Added for the right behaviour.")


def should_refuse(item: dict[str, Any], rule: str | None) -> bool:
    """Whether ``item`` is a prompt to refuse under ``refuse_if`` (``field=value`` or ``field``)."""
    if rule is None:
        return False
    field, sep, want = rule.partition("=")
    value = item.get(field)
    if not sep:
        return bool(value)
    if isinstance(value, str) and "/" in value:
        value = value.split("/")
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return value is not None and str(value) == want


@register("reward", "refusal", settings=RefusalSettings)
class RefusalReward(Reward):
    def refuses(self, response: str) -> bool:
        text = response.strip().lower()
        phrases = [p.lower() for p in self.settings.phrases]
        if self.settings.where == "start":
            return any(text.startswith(p) for p in phrases)
        return any(p in text for p in phrases)

    def score(self, batch: RewardInput) -> torch.Tensor:
        s = self.settings
        values = []
        for item, response in zip(batch.items, batch.responses, strict=True):
            right = self.refuses(response) == should_refuse(item, s.refuse_if)
            values.append(s.bonus if right else -s.penalty)
        return _scores(values, batch)
