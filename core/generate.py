"""Batched incremental decoding with a KV cache: greedy or temperature / top-k / top-p sampling.

Prompts of different lengths are left-padded into one batch (padding is segment 0, which attention
never sees) so that every row's next token sits in the last column. Under tensor parallelism every rank
runs the same loop: the head's forward returns logits gathered over tp, and the sampling generator is
seeded alike everywhere, so all ranks draw the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: list[list[int]],
    sampling: Sampling,
    eos_id: int,
    pad_id: int = 0,
    group: dist.ProcessGroup | None = None,
    vocab_limit: int | None = None,
    row_seeds: Sequence[int] | None = None,
) -> list[list[int]]:
    """Each prompt's continuation (without the prompt), ending with eos when the model produced one.

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
    out: list[list[int]] = [[] for _ in prompts]
    for step in range(sampling.max_new_tokens):
        if vocab_limit is not None:
            logits[:, vocab_limit:] = float("-inf")
        tok = next_token(logits, seen, sampling, generator)
        for i in (~done).nonzero()[:, 0].tolist():
            out[i].append(int(tok[i]))
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
