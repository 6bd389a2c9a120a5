"""The ``pretrain`` algorithm: next-token prediction on packed sequences with the configured loss terms."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from haina.core.algorithm import Algorithm
from haina.core.data import PretrainBatches
from haina.core.loss import chunked_lm_loss, vocab_shard_of
from haina.core.registry import register
from haina.core.tokenizer import Tokenizer

if TYPE_CHECKING:
    from haina.core.config import HainaConfig
    from haina.core.loss import LossOutput

BAICHUAN_EOS_ID = 2


def eos_id_of(tokenizer_model: str | None) -> int:
    """The data's document separator: the tokenizer's eos, or Baichuan's id 2 when none is named."""
    if tokenizer_model is None:
        return BAICHUAN_EOS_ID
    return Tokenizer(tokenizer_model, field="data.tokenizer").eos_id


@register("algorithm", "pretrain")
class Pretrain(Algorithm):
    """Causal language modelling; the loss is computed from hidden states in chunks (no full logits)."""

    def __init__(self, cfg: HainaConfig) -> None:
        super().__init__(cfg)
        self.terms = dict(cfg.loss.terms)
        self.term_settings = {name: cfg.loss.settings_of(name) for name in self.terms}
        self.chunk_size = cfg.loss.chunk_size

    def batches(self, cfg: HainaConfig, run_dir: Path, num_samples: int) -> PretrainBatches:
        tcfg = cfg.train
        return PretrainBatches(
            cfg.data,
            seq_len=tcfg.seq_len,
            micro_batch_size=tcfg.micro_batch_size,
            num_samples=num_samples,
            seed=tcfg.seed,
            eod=eos_id_of(cfg.data.tokenizer),
            vocab_size=cfg.model.vocab_size,
            cache_dir=run_dir / "data_cache",
        )

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> LossOutput:
        tokens, labels = (t.to(next(model.parameters()).device) for t in batch)
        return self.loss_from_hidden(model, model(tokens), labels)

    def loss_from_hidden(self, model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        """The loss from final hidden states; a pipeline's last stage calls this with its own module.

        Under tensor parallelism the head weight is a vocabulary-sharded DTensor: the loss runs on this
        rank's rows without gathering logits, on full-sequence hidden states (gathered here if they
        arrive as a sequence-sharded DTensor); ``labels`` must be the same on every tp rank.
        """
        from torch.distributed.tensor import DTensor, Replicate

        weight, shard = vocab_shard_of(model.head.effective_weight())
        if isinstance(hidden, DTensor):
            hidden = hidden.redistribute(hidden.device_mesh, [Replicate()] * hidden.device_mesh.ndim).to_local()
        return chunked_lm_loss(
            hidden.flatten(0, 1), weight, labels.flatten(), self.terms, self.chunk_size,
            tp_group=None if shard is None else shard.group, vocab_start=0 if shard is None else shard.start,
            settings=self.term_settings,
        )
