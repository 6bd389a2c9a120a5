"""Training batches from Megatron indexed datasets through megatron-core's GPT and blended datasets.

megatron-core owns the packing (documents concatenated with eos and cut into sequences) and the
seeded, deterministic shuffle; this module only asks it for the samples of a given step, so the data
position is a single counter of consumed samples that a checkpoint can store.

Two things megatron-core trusts are checked here first: the ``.bin``/``.idx`` files
(:mod:`haina.core.indexed_dataset`), and its sample-index cache. megatron writes that cache in place and
counts "every file exists" as a hit, so a build killed mid-``numpy.save`` left a truncated ``.npy`` that
failed every restart. haina therefore lets megatron build into a staging folder beside ``data_cache`` and
publishes it atomically with a manifest (:func:`haina.core.files.publish_dir`); a cache whose manifest does
not verify, or a staging folder a killed build left, is rebuilt from scratch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from haina.core import collectives
from haina.core.config import ConfigError, DataConfig
from haina.core.distributed import is_main_process
from haina.core.errors import InputFileError, one_line
from haina.core.files import CheckpointError, publish_dir, read_manifest, verify_manifest
from haina.core.indexed_dataset import check_indexed_dataset

# megatron-core announces at import that Transformer Engine and apex are absent; haina uses neither there.
warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"megatron\.")

IGNORE_INDEX = -100
log = logging.getLogger("haina.data")


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


def check_data_files(cfg: DataConfig) -> None:
    """Every ``.bin``/``.idx`` pair the data section names, checked in this process (the multi-process
    launcher's check before it starts workers, so a bad file exits 2 there, not inside torchrun)."""
    if cfg.blend is None and not cfg.prefixes:
        return
    prefixes, _ = resolve_blend(cfg)
    for prefix in prefixes:
        check_indexed_dataset(prefix, "data.blend" if cfg.blend is not None else "data.prefixes")


def _check_prefixes(prefixes: list[str], field: str) -> None:
    """:func:`check_indexed_dataset` of every prefix, read on rank 0 only (an index of a large corpus is
    gigabytes), its verdict raised on every rank alike: a refusal on rank 0 alone would leave the others
    waiting in megatron's barrier."""
    problem = None
    if is_main_process():
        try:
            for prefix in prefixes:
                check_indexed_dataset(prefix, field)
        except InputFileError as exc:
            problem = str(exc)
    problem = collectives.broadcast_object(problem)
    if problem is not None:
        raise InputFileError(problem)


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
        _check_prefixes(prefixes, "data.blend" if cfg.blend is not None else "data.prefixes")
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
    """megatron's blended GPT dataset, its sample indices cached in ``cache_dir`` crash-safely.

    The ranks verify the cache together (:func:`_cache_verifies`) and rank 0 stages it
    (:func:`_stage_cache`). Every rank points megatron at the staging folder: megatron builds what is
    missing there on rank 0 while the others wait, then they read it. Once every rank holds its indices
    (mapped into memory, so the folder may move), rank 0 publishes the staging folder as ``cache_dir``
    if megatron added files, else drops it.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron warns that Transformer Engine / apex are absent
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    logging.getLogger("megatron.core").setLevel(logging.WARNING)
    staging = cache_dir.with_name(f".{cache_dir.name}.tmp")
    verified = _cache_verifies(cache_dir)
    main = is_main_process()
    known = _stage_cache(cache_dir, staging, verified) if main else {}
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_len,
        blend=(prefixes, weights),
        split="100,0,0",
        path_to_cache=str(staging),
        tokenizer=_TokenInfo(eod=eod, vocab_size=vocab_size),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0], lambda: True, config).build()
    collectives.barrier()  # every rank has mapped its indices: the staging folder may move now
    if main:
        if set(os.listdir(staging)) == set(known):
            shutil.rmtree(staging)  # all hits: cache_dir already holds these very files
        else:
            publish_dir(staging, cache_dir, known=known)
    return train


def _cache_verifies(cache_dir: Path) -> bool:
    """Whether every file of ``cache_dir`` matches its manifest (size and CRC-32), on every rank alike; the
    ranks share the reading. A truncated file, or a cache from before haina published caches (no
    manifest), is logged and answers False: megatron builds it again."""
    rank, world = collectives.rank_world()
    bad = not cache_dir.is_dir()
    if not bad:
        try:
            verify_manifest(cache_dir, (rank, world))
        except CheckpointError as exc:
            bad = True
            log.warning("data cache %s is rebuilt: %s", cache_dir, one_line(exc))
    return not collectives.any_true(bad)


def _stage_cache(cache_dir: Path, staging: Path, verified: bool) -> dict[str, Any]:
    """A fresh ``staging`` folder holding hard links to the files of ``cache_dir`` when it ``verified``;
    their manifest entries are returned (the publish need not read them again). A staging folder left by
    a killed build is removed first: what megatron wrote there may be cut short."""
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if not verified:
        return {}
    entries: dict[str, Any] = read_manifest(cache_dir)["files"]
    for name in entries:
        try:
            os.link(cache_dir / name, staging / name)
        except OSError:  # a file system without hard links
            shutil.copy2(cache_dir / name, staging / name)
    return entries
