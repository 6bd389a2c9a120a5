"""Batched incremental decoding with a KV cache: greedy or temperature / top-k / top-p sampling.

Prompts of different lengths are left-padded into one batch (padding is segment 0, which attention
never sees) so that every row's next token sits in the last column. Under tensor parallelism every rank
runs the same loop: the head's forward returns logits gathered over tp, and the sampling generator is
seeded alike everywhere, so all ranks draw the same tokens.

:class:`Generator` is the seam RL rollouts sample through (prompts in, token ids and their log-probabilities
out); :class:`ModelGenerator`, this loop on the trained model itself, is the default, and an engine such as
vLLM or SGLang fits behind the same two methods (``docs/rl.md``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from haina.core import collectives
from haina.core.kv_cache import KVCache


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen; ``temperature == 0`` is greedy."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0:
            raise ValueError(
                "sampling wants temperature >= 0, 0 < top_p <= 1, top_k >= 0 and repetition_penalty > 0"
            )


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty: tokens already in the row get positive logits divided, negative multiplied."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """-inf outside the k most likely tokens and outside the smallest set whose probability reaches p."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(
    logits: torch.Tensor, seen: torch.Tensor, sampling: Sampling, generator: torch.Generator | list[torch.Generator]
) -> torch.Tensor:
    """[b, vocab] fp32 logits -> [b] token ids; ``generator`` is one for the batch or one per row."""
    logits = apply_repetition_penalty(logits, seen, sampling.repetition_penalty)
    if sampling.temperature == 0:
        return logits.argmax(-1)
    logits = filter_top_k_top_p(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    probs = logits.softmax(-1).cpu()
    if isinstance(generator, list):
        rows = [torch.multinomial(probs[i : i + 1], 1, generator=g)[0] for i, g in enumerate(generator)]
        return torch.cat(rows).to(logits.device)
    return torch.multinomial(probs, 1, generator=generator)[:, 0].to(logits.device)


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(tokens, positions, segments), each [b, longest]: rows right-aligned, padding in segment 0."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate wants at least one prompt and no empty prompt")
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    segments = torch.zeros_like(tokens)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p) :] = torch.tensor(p)
        segments[i, width - len(p) :] = 1
    positions = (segments.cumsum(1) - 1).clamp(min=0)
    return tokens.to(device), positions.to(device), segments.to(device)


def _all_done(done: torch.Tensor, group: dist.ProcessGroup | None) -> bool:
    if group is None:
        return bool(done.all())
    return not collectives.any_true(bool((~done).any()), group)


@dataclass
class Generation:
    """One prompt's continuation (without the prompt, ending with eos when the model produced one) and the
    log-probability of each of its tokens under the model at the sampling temperature (1 for greedy),
    before top-k / top-p / repetition-penalty filtering: the policy's own distribution, which RL's ratio
    compares against."""

    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


class Generator(ABC):
    """What an RL rollout samples with: prompts in, token ids and log-probabilities out.

    ``sync`` is called with the actor before each rollout: an engine that keeps its own copy of the weights
    (vLLM, SGLang) loads them from it there; one that samples from the module itself has nothing to do."""

    @abstractmethod
    def generate(self, prompts: list[list[int]], sampling: Sampling, row_seeds: Sequence[int]) -> list[Generation]:
        """One :class:`Generation` per prompt; prompt i draws with seed ``row_seeds[i]``."""

    def sync(self, model: nn.Module) -> None:  # noqa: B027 - an optional hook, not an abstract method
        """Take the actor's current weights (default: nothing to take)."""


class ModelGenerator(Generator):
    """:func:`sample` on the module it is given: haina's KV-cache loop, under any parallel layout."""

    def __init__(self, eos_id: int, group: dist.ProcessGroup | None = None, vocab_limit: int | None = None) -> None:
        self.eos_id, self.group, self.vocab_limit = eos_id, group, vocab_limit
        self.model: nn.Module | None = None

    def sync(self, model: nn.Module) -> None:
        self.model = model

    def generate(self, prompts: list[list[int]], sampling: Sampling, row_seeds: Sequence[int]) -> list[Generation]:
        if self.model is None:
            raise RuntimeError("ModelGenerator.generate before sync(model)")
        return sample(self.model, prompts, sampling, self.eos_id, group=self.group, vocab_limit=self.vocab_limit,
                      row_seeds=row_seeds)


def generate(model: nn.Module, prompts: list[list[int]], sampling: Sampling, eos_id: int, **options: Any) -> list[list[int]]:
    """Each prompt's continuation: :func:`sample` (same options) without the log-probabilities."""
    return [g.ids for g in sample(model, prompts, sampling, eos_id, **options)]


@torch.no_grad()
def sample(
    model: nn.Module,
    prompts: list[list[int]],
    sampling: Sampling,
    eos_id: int,
    pad_id: int = 0,
    group: dist.ProcessGroup | None = None,
    vocab_limit: int | None = None,
    row_seeds: Sequence[int] | None = None,
) -> list[Generation]:
    """Each prompt's continuation and its tokens' log-probabilities (see :class:`Generation`).

    ``vocab_limit``: only ids below it are drawn (a model's vocabulary padded past its tokenizer's).
    ``row_seeds``: one sampling seed per prompt instead of ``sampling.seed`` for the batch, so a prompt
    draws the same tokens whichever rank, batch or position it lands in (data-parallel rollouts that
    repeat a one-process run).

    With ``group``, decoding stops only when every rank of it is done: ranks that shard one model (FSDP)
    must run the same number of forward passes, whatever their own prompts.
    """
    device = next(model.parameters()).device
    tokens, positions, segments = left_pad(prompts, pad_id, device)
    b, width = tokens.shape
    vocab = model.cfg.vocab_size
    if row_seeds is not None and len(row_seeds) != len(prompts):
        raise ValueError(f"row_seeds: {len(row_seeds)} seeds for {len(prompts)} prompts")
    generator: torch.Generator | list[torch.Generator] = (
        torch.Generator().manual_seed(sampling.seed) if row_seeds is None
        else [torch.Generator().manual_seed(int(s)) for s in row_seeds]
    )
    cache = KVCache(b, width + sampling.max_new_tokens)
    seen = torch.zeros(b, vocab, dtype=torch.bool, device=device)
    seen.scatter_(1, tokens, segments.bool())
    logits = model(tokens, positions, segments=segments, cache=cache, logits=slice(-1, None))[:, -1].float()
    next_pos = positions[:, -1:] + 1
    done = torch.zeros(b, dtype=torch.bool, device=device)
    out = [Generation() for _ in prompts]
    inv_temperature = 1.0 / sampling.temperature if sampling.temperature > 0 else 1.0
    for step in range(sampling.max_new_tokens):
        if vocab_limit is not None:
            logits[:, vocab_limit:] = float("-inf")
        tok = next_token(logits, seen, sampling, generator)
        logp = torch.log_softmax(logits * inv_temperature, dim=-1).gather(1, tok[:, None])[:, 0].tolist()
        for i in (~done).nonzero()[:, 0].tolist():
            out[i].ids.append(int(tok[i]))
            out[i].logprobs.append(logp[i])
        done |= tok == eos_id
        if _all_done(done, group) or step == sampling.max_new_tokens - 1:
            break
        seen[torch.arange(b, device=device), tok] = True
        step_tokens = torch.where(done, pad_id, tok)[:, None]
        logits = model(
            step_tokens, next_pos, segments=torch.ones_like(step_tokens), cache=cache, logits=slice(-1, None)
        )[:, -1].float()
        next_pos = next_pos + 1
    return out
