"""Loss-spike and NaN guard: skip an update that would poison the weights, roll back when it persists.

Why: one non-finite gradient or a batch that explodes the loss can destroy weeks of training, and
Baichuan 2 reports loss spikes as a standing risk at scale. A bad step (non-finite loss or gradient
norm, or a loss above ``mean + sigma * std`` of the recent accepted losses once ``warmup`` of them
exist) keeps the weights as they are; after ``max_bad_steps`` bad steps in a row the trainer reloads
the last checkpoint and continues past the offending data. The inputs are the globally reduced loss and
gradient norm, and the verdict is all-reduced as well, so every rank takes the same branch.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from haina.core import collectives

# verdicts, ordered by severity (the all-reduce keeps the worst)
OK, SPIKE, NONFINITE_LOSS, NONFINITE_GRAD = 0, 1, 2, 3
KINDS = {SPIKE: "loss_spike", NONFINITE_LOSS: "nonfinite_loss", NONFINITE_GRAD: "nonfinite_grad_norm"}


class SpikeGuard:
    """Running statistics of accepted losses and the count of consecutive bad steps."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.losses: deque[float] = deque(maxlen=cfg.window)
        self.bad_streak = 0

    def verdict(self, loss: float, grad_norm: float, spikes: bool = True) -> int:
        """This rank's verdict on the step; see :func:`agree` for the one all ranks act on. ``spikes=False``
        judges finiteness only (an algorithm's own loss, such as PPO's, has no stable statistics)."""
        if not self.cfg.enabled:
            return OK
        if not math.isfinite(grad_norm):
            return NONFINITE_GRAD
        if not math.isfinite(loss):
            return NONFINITE_LOSS
        if spikes and len(self.losses) >= max(self.cfg.warmup, 2):
            mean = sum(self.losses) / len(self.losses)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.losses) / (len(self.losses) - 1))
            if loss > mean + self.cfg.sigma * std + self.cfg.min_margin:
                return SPIKE
        return OK

    def record(self, loss: float, verdict: int) -> bool:
        """Count the step; True when the streak of bad steps calls for a rollback."""
        if verdict == OK:
            self.losses.append(loss)
            self.bad_streak = 0
            return False
        self.bad_streak += 1
        return 0 < self.cfg.max_bad_steps <= self.bad_streak

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "bad_streak": self.bad_streak}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state:
            self.losses = deque(state.get("losses", []), maxlen=self.cfg.window)
            self.bad_streak = int(state.get("bad_streak", 0))


def agree(verdict: int) -> int:
    """The worst verdict over all ranks (identical inputs give identical verdicts; this makes sure)."""
    return collectives.max_int(verdict)
