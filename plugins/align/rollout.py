"""Rollouts shared by the RL algorithms (ppo, grpo, rloo, reinforce_pp): how responses are sampled, ``n``
of them per prompt with the KV-cache generator of :mod:`haina.core.generate`, the right-padded rows with
the mask of the positions that predict response tokens, and what a reward sees of them.

A group's ``n`` copies of a prompt sit next to each other (rows ``g * n .. g * n + n - 1``) on the rank
that drew the prompt, so group statistics (GRPO's mean and std, RLOO's leave-one-out mean) need no
communication.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from pydantic import Field
from torch import nn

from haina.core.config import ConfigError, PluginSettings
from haina.core.generate import Generator, ModelGenerator, Sampling
from haina.plugins.align.common import IGNORE, shifted_targets
from haina.plugins.align.packing import ModelInputs, model_inputs
from haina.plugins.align.preference_data import response_mask_from_prompts
from haina.plugins.rewards.base import RewardInput, RewardSpec
from haina.plugins.rewards.verifier import load_function

if TYPE_CHECKING:
    from haina.core.engine import Engine

__all__ = [
    "RLSettings", "Rollout", "SamplingSettings", "check_rl_settings", "last_user_turn", "make_generator",
    "mini_batch_rows", "padded_rows", "per_position", "row_chunks", "sample_rollout",
]


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


class RLSettings(PluginSettings):
    """What every RL algorithm (ppo, grpo, rloo, reinforce_pp) has; each sets its paper's defaults."""

    reward: RewardSpec = Field(
        default_factory=list, description="Reward terms: a reward plugin, or a list of {type, name, weight, "
        "<settings>} summed (see haina.plugins.rewards.base).",
    )
    reference: str | None = Field(None, description="Frozen reference checkpoint; default: align.init_from.")
    clip: float = Field(0.2, gt=0, description="PPO ratio clip epsilon.")
    epochs: int = Field(1, gt=0, description="Passes over each rollout batch.")
    mini_batches: int = Field(
        1, gt=0, description="Optimizer steps per pass: each rank's rollout rows, shuffled alike on every rank, "
        "cut into this many mini-batches.",
    )
    rollout_micro_batch: int = Field(
        0, ge=0, description="Rows generated and scored at once (0: all of a step's rows); bounds rollout memory.",
    )
    pack: bool = Field(
        False, description="Pack rollout rows end to end (segments) for scoring and updates: no forward on padding.",
    )
    generator: str = Field(
        "", description="module:Class of a haina.core.generate.Generator built as Class(cfg, tokenizer) "
        "(e.g. a vLLM engine; docs/rl.md); empty: haina's own decoding on the actor.",
    )
    sampling: SamplingSettings = Field(default_factory=SamplingSettings, description="Rollout sampling.")


def check_rl_settings(cfg: Any, own: RLSettings, where: str, n_samples: int = 1) -> None:
    """Refuse, in one line, structure settings a step cannot honour."""
    rows = cfg.train.micro_batch_size * n_samples
    if own.mini_batches > rows:
        raise ConfigError(f"{where}.mini_batches: {own.mini_batches} mini-batches, but a rank may hold only {rows} "
                          f"rollout rows (train.micro_batch_size x samples per prompt)")


def make_generator(spec: str, cfg: Any, tokenizer: Any, where: str) -> Generator:
    """The rollout generator: haina's loop on the actor, or the user's ``module:Class`` (a one-line
    ConfigError at ``where`` when it cannot be had or is not a Generator)."""
    if not spec:
        group = dist.group.WORLD if dist.is_initialized() else None
        return ModelGenerator(tokenizer.eos_id, group=group, vocab_limit=tokenizer.vocab_size)
    made = load_function(spec, where)(cfg, tokenizer)
    if not isinstance(made, Generator):
        raise ConfigError(f"{where}: {spec} made a {type(made).__name__}, not a haina.core.generate.Generator")
    return made


def row_chunks(n: int, size: int) -> list[slice]:
    """Slices of ``size`` rows (all ``n`` at once when ``size`` is 0)."""
    size = size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def mini_batch_rows(n: int, mini_batches: int, seed: int) -> list[torch.Tensor]:
    """Row indices of each mini-batch: a permutation of ``n`` rows from ``seed`` (the same on every rank, so
    tensor-parallel copies of a rank's rows stay together), cut into ``mini_batches`` near-equal parts."""
    if mini_batches > n:
        raise ValueError(f"{mini_batches} mini-batches of {n} rollout rows: each needs at least one row")
    if mini_batches == 1:
        return [torch.arange(n)]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return list(torch.tensor_split(order, mini_batches))


def per_position(
    fn: Callable[[ModelInputs], torch.Tensor], tokens: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor,
    micro_batch: int = 0, pack: bool = False,
) -> torch.Tensor:
    """[b, T] per-position values of a forward (log-probabilities, values), ``micro_batch`` rows at a time and
    packed when asked: ``fn`` gets each chunk's :class:`ModelInputs` and returns [rows, W]."""
    out = []
    for chunk in row_chunks(tokens.shape[0], micro_batch):
        inputs = model_inputs(tokens[chunk], targets[chunk], lengths[chunk], pack)
        out.append(inputs.unpack(fn(inputs)))
    return torch.cat(out)


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
    gen_logp: torch.Tensor  # [b, s]: the generator's log-probability of the token position t predicts (0 off mask)
    prompt_lens: list[int]
    replies: list[list[int]]
    finished: list[bool]  # the reply ended with eos
    items: list[dict[str, Any]]  # the prompt record of each row
    n_samples: int
    rollout_s: float

    @property
    def new_tokens(self) -> int:
        return sum(len(r) for r in self.replies)

    @property
    def lengths(self) -> torch.Tensor:
        """[b] tokens in each row (prompt + response)."""
        return self.last + 1

    def reward_input(self, tokenizer: Any) -> RewardInput:
        eos = tokenizer.eos_id
        texts = [tokenizer.decode(r[:-1] if r and r[-1] == eos else r) for r in self.replies]
        return RewardInput(
            prompts=[last_user_turn(it.get("prompt")) for it in self.items], responses=texts, items=self.items,
            tokens=self.tokens, last=self.last, response_lengths=[len(r) for r in self.replies],
            finished=self.finished,
        )


def padded_rows(
    prompts: list[list[int]], replies: list[list[int]], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Prompt + reply rows right-padded with 0 [b, s], their next-token targets on the reply (IGNORE
    elsewhere), and each row's length."""
    rows = [p + r for p, r in zip(prompts, replies, strict=True)]
    width = max(len(r) for r in rows)
    tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)
    lengths = [len(r) for r in rows]
    response = response_mask_from_prompts([len(p) for p in prompts], lengths, width).to(device)
    return tokens, shifted_targets(tokens, response), lengths


@torch.no_grad()
def sample_rollout(
    engine: Engine,
    generator: Generator,
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
    micro_batch: int = 0,
) -> Rollout:
    """``n_samples`` responses to each prompt, ``micro_batch`` rows at a time (0: all at once), cut so
    prompt + response fits ``seq_len``.

    Every rank of the world decodes until all are done (FSDP and tp ranks must run the same number of
    forwards), and every rank holds as many rows, so all make the same calls. ``seed`` differs per step;
    sample k of the prompt at stream position p draws with seed ``seed + p * n_samples + k``, so the
    samples depend neither on the layout that spreads the prompts nor on the micro-batch size.
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
    generator.sync(actor)
    drawn = []
    with engine.autocast:
        for chunk in row_chunks(len(prompts), micro_batch):
            drawn += generator.generate(prompts[chunk], config, row_seeds[chunk])
    rollout_s = time.perf_counter() - start
    replies = [g.ids[: seq_len - len(p)] or [eos] for p, g in zip(prompts, drawn, strict=True)]
    finished = [r == g.ids and r[-1] == eos for r, g in zip(replies, drawn, strict=True)]
    device = engine.device
    tokens, targets, lengths = padded_rows(prompts, replies, device)
    gen_logp = torch.zeros(tokens.shape, dtype=torch.float32)
    for i, (p, r, g) in enumerate(zip(prompts, replies, drawn, strict=True)):
        if r == g.ids[: len(r)]:  # not a reply cut to nothing, which became an [eos] the generator never drew
            gen_logp[i, len(p) - 1 : len(p) - 1 + len(r)] = torch.tensor(g.logprobs[: len(r)])
    return Rollout(
        tokens=tokens, targets=targets, mask=targets != IGNORE, last=torch.tensor(lengths, device=device) - 1,
        gen_logp=gen_logp.to(device), prompt_lens=[len(p) for p in prompts], replies=replies, finished=finished,
        items=items, n_samples=n_samples, rollout_s=rollout_s,
    )
