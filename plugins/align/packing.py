"""Response packing: a rollout's right-padded rows laid end to end in fewer rows of the same width.

Rollout rows (prompt + response) differ in length, and a batch padded to its longest row spends the
forward and backward on padding. Packed, each row becomes a segment of a longer row (its own positions
from 0, attention kept inside the segment by the model's ``segments``), so the model computes the same
per-token values on fewer positions; :meth:`Packed.unpack` puts per-position results back in the rollout's
[b, T] layout for the losses, which never see the packing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from haina.plugins.align.common import IGNORE

__all__ = ["ModelInputs", "Packed", "model_inputs", "pack_rows"]


@dataclass
class Packed:
    """Packed rows [p, W] and where each original row went: packed row, start column, length."""

    tokens: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor
    segments: torch.Tensor
    row: torch.Tensor  # [b]
    start: torch.Tensor  # [b]
    length: torch.Tensor  # [b]
    width: int  # the original rows' width T

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[p, W, ...] per-position values -> [b, T, ...]: each row's values at its own columns, 0 past its end."""
        b, t = self.row.shape[0], self.width
        cols = torch.arange(t, device=x.device)
        inside = cols[None, :] < self.length[:, None].to(x.device)
        src_col = (self.start[:, None].to(x.device) + cols[None, :]).clamp(max=x.shape[1] - 1)
        src_row = self.row[:, None].to(x.device).expand(b, t)
        out = x[src_row, src_col]
        return torch.where(inside.view(b, t, *([1] * (x.dim() - 2))), out, torch.zeros((), dtype=x.dtype, device=x.device))


def pack_rows(tokens: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor) -> Packed:
    """First-fit decreasing of rows (their first ``lengths`` tokens) into rows of the batch's width.

    A row's targets keep their columns relative to the row, so position t of a segment still predicts its
    token t + 1; the segment's last target is IGNORE (it would predict the next segment's first token)."""
    b, width = tokens.shape
    lengths_list = [int(n) for n in lengths.tolist()]
    free: list[int] = []  # room left in each packed row
    row, start = [0] * b, [0] * b
    for r in sorted(range(b), key=lambda i: -lengths_list[i]):
        for p, room in enumerate(free):
            if room >= lengths_list[r]:
                row[r], start[r] = p, width - room
                free[p] -= lengths_list[r]
                break
        else:
            row[r], start[r] = len(free), 0
            free.append(width - lengths_list[r])
    p = len(free)
    device = tokens.device
    out = Packed(
        tokens=torch.zeros(p, width, dtype=tokens.dtype, device=device),
        targets=torch.full((p, width), IGNORE, dtype=targets.dtype, device=device),
        positions=torch.zeros(p, width, dtype=torch.long, device=device),
        segments=torch.zeros(p, width, dtype=torch.long, device=device),
        row=torch.tensor(row), start=torch.tensor(start), length=torch.tensor(lengths_list), width=width,
    )
    segment_count = [0] * p
    for r in range(b):
        n, pr, s = lengths_list[r], row[r], start[r]
        segment_count[pr] += 1
        out.tokens[pr, s : s + n] = tokens[r, :n]
        out.targets[pr, s : s + n] = targets[r, :n]
        out.targets[pr, s + n - 1] = IGNORE
        out.positions[pr, s : s + n] = torch.arange(n, device=device)
        out.segments[pr, s : s + n] = segment_count[pr]
    return out


@dataclass
class ModelInputs:
    """What a forward over a rollout takes (packed or not) and how to map its results back to [b, T]."""

    tokens: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor | None = None
    segments: torch.Tensor | None = None
    packed: Packed | None = None

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.packed is None else self.packed.unpack(x)


def model_inputs(tokens: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor, pack: bool) -> ModelInputs:
    """The rows as they are, or packed (see :func:`pack_rows`)."""
    if not pack:
        return ModelInputs(tokens, targets)
    packed = pack_rows(tokens, targets, lengths)
    return ModelInputs(packed.tokens, packed.targets, packed.positions, packed.segments, packed)
