"""What the alignment algorithms (sft, rm, dpo, ppo) share: layout limits, the tokenizer, token log-probs.

They run on the same engine as pretraining with tensor and sharded data parallelism. Pipeline stages
would need segment ids and several models per stage, and sequence parallelism would shard the
sequence that generation and per-token log-probs read whole, so both are refused up front.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from haina.core.config import ConfigError

if TYPE_CHECKING:
    from haina.core.config import HainaConfig
    from haina.tools.tokenizer import Tokenizer

IGNORE = -100


@functools.lru_cache(maxsize=8)
def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The seeded shuffle of pass ``epoch`` over ``n`` items: item ``p`` of the run is
    ``epoch_order(n, seed, p // n)[p % n]``, so micro-batch ``i`` is the same on every rank and resume."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919 * epoch)).tolist()


def read_jsonl_objects(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(``file:line``, object) for each non-blank line; a bad line is a ValueError naming it."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(item, dict):
                raise ValueError(f"{where}: each line must be a JSON object")
            yield where, item


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


def config_check(name: str, needs: tuple[str, ...] = ()) -> staticmethod:
    """An algorithm class's ``check_config(cfg)``: the engine and the CLI call it before any process starts.

    ``needs``: ``align`` fields that must be set (starting checkpoints).
    """

    def check(cfg: HainaConfig) -> None:
        check_layout(cfg, name)
        for key in needs:
            if getattr(cfg.align, key) is None:
                raise ConfigError(f"align.{key}: the {name} algorithm needs it")

    return staticmethod(check)


def tokenizer_path(cfg: HainaConfig) -> str | None:
    return cfg.align.tokenizer or cfg.data.tokenizer


def load_tokenizer(cfg: HainaConfig) -> Tokenizer:
    from haina.tools.tokenizer import Tokenizer

    path = tokenizer_path(cfg)
    if path is None:
        raise ConfigError("align.tokenizer: no SentencePiece model named")
    return Tokenizer(path, user_token=cfg.tokenizer.user_token, assistant_token=cfg.tokenizer.assistant_token)


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
