"""What the alignment algorithms (sft, rm, dpo, ppo) share: layout limits, the tokenizer, token log-probs.

They run on the same engine as pretraining with tensor and sharded data parallelism. Pipeline stages
would need segment ids and several models per stage, and sequence parallelism would shard the
sequence that generation and per-token log-probs read whole, so both are refused up front.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from haina.core.config import ConfigError, plugin_settings
from haina.core.files import read_jsonl
from haina.core.tokenizer import tokenizer_path

if TYPE_CHECKING:
    from haina.core.config import HainaConfig

IGNORE = -100


@functools.lru_cache(maxsize=8)
def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The seeded shuffle of pass ``epoch`` over ``n`` items: item ``p`` of the run is
    ``epoch_order(n, seed, p // n)[p % n]``, so micro-batch ``i`` is the same on every rank and resume."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919 * epoch)).tolist()


read_jsonl_objects = read_jsonl  # the one JSONL reader (haina.core.files)


def check_layout(cfg: HainaConfig, name: str) -> None:
    """One-line refusal of layouts an alignment algorithm cannot run, and of missing inputs."""
    if cfg.parallel.pp > 1:
        raise ConfigError(f"parallel.pp: the {name} algorithm runs without pipeline parallelism (pp=1)")
    if cfg.parallel.tp > 1 and cfg.parallel.sequence_parallel:
        raise ConfigError(
            f"parallel.sequence_parallel: the {name} algorithm runs tp without sequence parallelism (set it false)"
        )
    if cfg.align.data is None:
        raise ConfigError(f"align.data: the {name} algorithm needs a JSONL file")
    if tokenizer_path(cfg) is None:
        raise ConfigError(f"align.tokenizer: the {name} algorithm needs the SentencePiece model (or data.tokenizer)")


def config_check(name: str, needs: tuple[str, ...] = ()) -> classmethod:
    """An algorithm class's ``check_config(cfg)``: the engine and the CLI call it before any process starts.

    ``needs``: fields that must be set (starting checkpoints), ``align.init_from`` or the algorithm's own
    settings (``ppo.reward_model``).
    """

    def check(cls: type, cfg: HainaConfig) -> None:
        check_layout(cfg, name)
        own = plugin_settings(cfg, "algorithm", name)
        for key in needs:
            section, _, field = key.rpartition(".")
            value = getattr(cfg.align, field) if section == "align" else getattr(own, field)
            if value is None:
                raise ConfigError(f"{key}: the {name} algorithm needs it")

    return classmethod(check)


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position in fp32, 0 where the target is ignored: [b, s, V], [b, s] -> [b, s]."""
    safe = targets.clamp(min=0)
    logp = -F.cross_entropy(logits.float().flatten(0, 1), safe.flatten(), reduction="none").view(targets.shape)
    return torch.where(targets == IGNORE, 0.0, logp)


def shifted_targets(tokens: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """Next-token targets [b, s] that count only where the next token is a response token.

    ``response`` [b, s] marks response tokens; position t predicts token t + 1.
    """
    targets = torch.full_like(tokens, IGNORE)
    targets[:, :-1] = torch.where(response[:, 1:], tokens[:, 1:], IGNORE)
    return targets
