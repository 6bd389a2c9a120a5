"""Rollouts shared by the RL algorithms (ppo, grpo, rloo, reinforce_pp): how responses are sampled, ``n``
of them per prompt with the KV-cache generator of :mod:`haina.core.generate`, the right-padded rows with
the mask of the positions that predict response tokens, and what a reward sees of them.

A group's ``n`` copies of a prompt sit next to each other (rows ``g * n .. g * n + n - 1``) on the rank
that drew the prompt, so group statistics (GRPO's mean and std, RLOO's leave-one-out mean) need no
communication.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from pydantic import Field
from torch import nn

from haina.core.config import PluginSettings
from haina.core.generate import Sampling, generate
from haina.plugins.align.common import IGNORE, shifted_targets
from haina.plugins.align.preference_data import response_mask_from_prompts
from haina.plugins.rewards.base import RewardInput

if TYPE_CHECKING:
    from haina.core.engine import Engine

__all__ = ["Rollout", "SamplingSettings", "last_user_turn", "sample_rollout"]


class SamplingSettings(PluginSettings):
    """How rollouts are sampled."""

    max_new_tokens: int = Field(64, gt=0, description="Longest continuation.")
    temperature: float = Field(1.0, ge=0, description="0 = greedy.")
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens (0 = all).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus mass.")
    repetition_penalty: float = Field(1.0, gt=0, description="CTRL-style penalty on seen tokens.")

    @property
    def logp_temperature(self) -> float:
        """The temperature log-probabilities are taken at: the sampler's (1 for greedy), so the ratio of
        new to old policy compares the distributions the tokens were drawn from."""
        return self.temperature if self.temperature > 0 else 1.0


def last_user_turn(turns: Any) -> str:
    """The text of the prompt's last user turn (what a verifier checks a response against)."""
    if isinstance(turns, str):
        return turns
    for turn in reversed(turns or []):
        if turn.get("role") == "user":
            return str(turn.get("content", ""))
    return ""


@dataclass
class Rollout:
    """``b`` sampled rows (prompt + response, right-padded with 0) and what the updates need of them."""

    tokens: torch.Tensor  # [b, s]
    targets: torch.Tensor  # [b, s]: next-token targets at response positions, IGNORE elsewhere
    mask: torch.Tensor  # [b, s] bool: position t predicts a response token
    last: torch.Tensor  # [b] index of each row's last token
    prompt_lens: list[int]
    replies: list[list[int]]
    finished: list[bool]  # the reply ended with eos
    items: list[dict[str, Any]]  # the prompt record of each row
    n_samples: int
    rollout_s: float

    @property
    def new_tokens(self) -> int:
        return sum(len(r) for r in self.replies)

    def reward_input(self, tokenizer: Any) -> RewardInput:
        eos = tokenizer.eos_id
        texts = [tokenizer.decode(r[:-1] if r and r[-1] == eos else r) for r in self.replies]
        return RewardInput(
            prompts=[last_user_turn(it.get("prompt")) for it in self.items], responses=texts, items=self.items,
            tokens=self.tokens, last=self.last, response_lengths=[len(r) for r in self.replies],
            finished=self.finished,
        )


@torch.no_grad()
def sample_rollout(
    engine: Engine,
    actor: nn.Module,
    prompts: list[list[int]],
    items: list[dict[str, Any]],
    sampling: SamplingSettings,
    *,
    tokenizer: Any,
    seq_len: int,
    seed: int,
    positions: list[int],
    n_samples: int = 1,
) -> Rollout:
    """``n_samples`` responses to each prompt, in one batch, cut so prompt + response fits ``seq_len``.

    Every rank of the world decodes until all are done (FSDP and tp ranks must run the same number of
    forwards). ``seed`` differs per step; sample k of the prompt at stream position p draws with seed
    ``seed + p * n_samples + k``, so the samples do not depend on the layout that spreads the prompts.
    """
    row_seeds = [seed + pos * n_samples + k for pos in positions for k in range(n_samples)]
    prompts = [p for p in prompts for _ in range(n_samples)]
    items = [it for it in items for _ in range(n_samples)]
    s = sampling
    config = Sampling(
        max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
        repetition_penalty=s.repetition_penalty, seed=seed,
    )
    eos = tokenizer.eos_id
    start = time.perf_counter()
    with engine.autocast:
        drawn = generate(
            actor, prompts, config, eos_id=eos, group=dist.group.WORLD if dist.is_initialized() else None,
            vocab_limit=tokenizer.vocab_size, row_seeds=row_seeds,
        )
    rollout_s = time.perf_counter() - start
    replies = [r[: seq_len - len(p)] or [eos] for p, r in zip(prompts, drawn, strict=True)]
    finished = [r == d and r[-1] == eos for r, d in zip(replies, drawn, strict=True)]
    rows = [p + r for p, r in zip(prompts, replies, strict=True)]
    width = max(len(r) for r in rows)
    device = engine.device
    tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)
    lengths = [len(r) for r in rows]
    response = response_mask_from_prompts([len(p) for p in prompts], lengths, width).to(device)
    targets = shifted_targets(tokens, response)
    return Rollout(
        tokens=tokens, targets=targets, mask=targets != IGNORE, last=torch.tensor(lengths, device=device) - 1,
        prompt_lens=[len(p) for p in prompts], replies=replies, finished=finished, items=items,
        n_samples=n_samples, rollout_s=rollout_s,
    )
