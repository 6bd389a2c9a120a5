"""Training batches from Megatron indexed datasets through megatron-core's GPT and blended datasets.

megatron-core owns the packing (documents concatenated with eos and cut into sequences) and the
seeded, deterministic shuffle; this module only asks it for the samples of a given step, so the data
position is a single counter of consumed samples that a checkpoint can store.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from haina.core.config import ConfigError, DataConfig

# megatron-core announces at import that Transformer Engine and apex are absent; haina uses neither there.
warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"megatron\.")

IGNORE_INDEX = -100


@dataclass(frozen=True)
class _TokenInfo:
    """What megatron's GPT dataset needs to know of the tokenizer (it has no pad: -1 is used)."""

    eod: int
    vocab_size: int

    @property
    def unique_identifiers(self) -> dict[str, object]:
        """Part of megatron's cache key for the built sample indices."""
        return {"class": "haina", "eod": self.eod, "vocab_size": self.vocab_size}


def resolve_blend(cfg: DataConfig) -> tuple[list[str], list[float] | None]:
    """The (prefixes, weights) to sample from: the config's own, or those of a blend.json."""
    if cfg.blend is None:
        if not cfg.prefixes:
            raise ConfigError("data: name .bin/.idx prefixes (data.prefixes) or a blend.json (data.blend)")
        return list(cfg.prefixes), list(cfg.weights) if cfg.weights else None
    path = Path(cfg.blend)
    try:
        datasets = json.loads(path.read_text(encoding="utf-8"))["datasets"]
        prefixes = [str(path.parent / d["prefix"]) for d in datasets]
        weights = [float(d["weight"]) for d in datasets]
    except FileNotFoundError:
        raise ConfigError(f"data.blend: {path} does not exist") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"data.blend: {path} is not a blend file ({type(exc).__name__}: {exc})") from None
    if not prefixes:
        raise ConfigError(f"data.blend: {path} lists no datasets")
    return prefixes, weights


def _check_prefix(prefix: str) -> None:
    for suffix in (".bin", ".idx"):
        if not Path(prefix + suffix).is_file():
            raise ConfigError(f"data.prefixes: {prefix + suffix} does not exist (make it with `haina data tokenize`)")


class PretrainBatches:
    """Deterministic batches of packed sequences: ``batch(i)`` is the i-th micro-batch of the run."""

    def __init__(
        self,
        cfg: DataConfig,
        *,
        seq_len: int,
        micro_batch_size: int,
        num_samples: int,
        seed: int,
        eod: int,
        vocab_size: int,
        cache_dir: Path,
    ) -> None:
        prefixes, weights = resolve_blend(cfg)
        for prefix in prefixes:
            _check_prefix(prefix)
        self.micro_batch_size = micro_batch_size
        self.dataset = _build_gpt_dataset(prefixes, weights, seq_len, num_samples, seed, eod, vocab_size, cache_dir)

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, labels), each [micro_batch_size, seq_len]; labels are the next tokens."""
        start = index * self.micro_batch_size
        samples = [self.dataset[(start + i) % len(self.dataset)] for i in range(self.micro_batch_size)]
        tokens = torch.stack([s["tokens"] for s in samples])
        labels = torch.stack([s["labels"] for s in samples])
        labels[torch.stack([s["loss_mask"] for s in samples]) == 0] = IGNORE_INDEX  # padding, if any
        return tokens, labels


def _build_gpt_dataset(
    prefixes: list[str], weights: list[float] | None, seq_len: int, num_samples: int, seed: int, eod: int, vocab_size: int, cache_dir: Path
) -> torch.utils.data.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron warns that Transformer Engine / apex are absent
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    logging.getLogger("megatron.core").setLevel(logging.WARNING)
    cache_dir.mkdir(parents=True, exist_ok=True)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_len,
        blend=(prefixes, weights),
        split="100,0,0",
        path_to_cache=str(cache_dir),
        tokenizer=_TokenInfo(eod=eod, vocab_size=vocab_size),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0], lambda: True, config).build()
    return train
