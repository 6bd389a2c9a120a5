"""Output-head plugins (``head`` kind): Baichuan 2's NormHead, a plain linear head, and a scalar value head.

A head holds ``weight`` [vocab, hidden] and exposes :meth:`effective_weight`, the matrix logits are really
computed with; the chunked loss calls it once per step and multiplies chunks of hidden states itself, so
the full [tokens, vocab] logits never exist at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from haina.core.registry import register

if TYPE_CHECKING:
    from haina.core.config import ModelConfig


@register("head", "linear")
class LinearHead(nn.Module):
    """logits = h @ W^T, untied from the input embedding."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.init_std = cfg.init_std
        self.vocab_size, self.hidden_size = cfg.vocab_size, cfg.hidden_size  # as built (ZeRO-3 empties weight)
        self.weight = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Same normal(0, init_std) as every other weight matrix (uses the current RNG)."""
        with torch.no_grad():
            self.weight.normal_(0.0, self.init_std)

    def effective_weight(self) -> torch.Tensor:
        return self.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.effective_weight())

    def tp_plan(self, sequence_parallel: bool) -> dict[str, Any]:
        """Rows split by vocabulary; effective_weight() of a subclass must be row-local (NormHead's is)."""
        # the TP styles load torch's DTensor (~0.4 s): only tensor-parallel layouts pay for it
        from haina.core.parallel.tensor_parallel import VocabParallelHead

        return {"": VocabParallelHead()}

    def extra_repr(self) -> str:
        return f"vocab={self.vocab_size}, hidden={self.hidden_size}"


@register("head", "normhead")
class NormHead(LinearHead):
    """logits = h @ normalize(W, dim=1)^T: every vocabulary row at unit L2 norm, no temperature.

    The normalization is redone on every call (not once at init) so the rows stay unit-norm however the
    optimizer moves the raw weight; Baichuan 2 credits this with stabilising training. Normalizing twice
    changes nothing, so an export may store the normalized matrix.
    """

    def effective_weight(self) -> torch.Tensor:
        # The norms in fp32 whatever the parameter's dtype (FSDP2 gathers bf16): each is a sum of H squares;
        # the result is rounded once, to the parameter's dtype.
        return F.normalize(self.weight.float(), dim=1).to(self.weight.dtype)


@register("head", "value")
class ValueHead(nn.Module):
    """One scalar per position in the LM head's place: the reward model's score and PPO's critic.

    Keeps the head's name (``head.weight``, now [1, hidden]) so a reward model or critic starts from a
    language-model checkpoint with every other weight loaded and this one freshly initialised.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, cfg.hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """normal(0, 1/sqrt(hidden)): unit-variance scores from unit-RMS normed hidden states."""
        with torch.no_grad():
            self.weight.normal_(0.0, self.weight.shape[1] ** -0.5)

    def effective_weight(self) -> torch.Tensor:
        return self.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """[..., hidden] -> [..., 1]"""
        return F.linear(h, self.weight)

    def tp_plan(self, sequence_parallel: bool) -> dict[str, Any]:
        """A single output row: replicated on every tp rank."""
        # the TP styles load torch's DTensor (~0.4 s): only tensor-parallel layouts pay for it
        from haina.core.parallel.tensor_parallel import ReplicatedParallel

        return {"": ReplicatedParallel()}
