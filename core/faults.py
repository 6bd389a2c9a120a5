"""Test-only fault injection: crash, kill or poison a run at a chosen point, to prove recovery works.

Off unless ``HAINA_FAULTS`` is set, e.g. ``step_end:sigkill@5:1,loss:nan@3-4,save_written:crash@4``:
``point:action@where[:rank][#attempt]``, where ``where`` is a step, a step range ``a-b`` or a name (a data
stage); for ``loss`` it counts global batches of data (so a rollback past bad data does not meet it again).
A fault fires on one attempt of a torchrun job (``TORCHELASTIC_RESTART_COUNT``, 0 or unset on the first),
the first unless ``#attempt`` names another, so a restarted run goes on past it, and one run can meet a
fault per restart (``step_end:sigkill@3:0,step_end:sigkill@5:1#1``). Actions: ``sigkill``/``sigterm``/``sigint`` (signal this process), ``exit`` (``os._exit(17)``,
no clean-up, like a crash between two writes), ``crash`` (raise :class:`InjectedFault`), ``nan`` and
``spike`` (the loss is multiplied by NaN or by 1000).
"""

from __future__ import annotations

import os
import signal

ENV = "HAINA_FAULTS"
LOSS_FACTORS = {"nan": float("nan"), "spike": 1000.0}


class InjectedFault(BaseException):
    """Raised by ``crash``; a BaseException so that no ``except Exception`` tidies up after it."""


def _matches(where: str, at: int | str) -> bool:
    if isinstance(at, int) and where.replace("-", "").isdigit():
        low, _, high = where.partition("-")
        return int(low) <= at <= int(high or low)
    return where == str(at)


def action(point: str, at: int | str, rank: int = 0) -> str | None:
    """The action configured for ``point`` at step/name ``at`` on ``rank``, if any."""
    spec = os.environ.get(ENV, "")
    if not spec:
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT") or "0"
    for item in spec.split(","):
        item, _, on_attempt = item.strip().partition("#")
        head, _, tail = item.partition("@")
        name, _, act = head.partition(":")
        where, _, on_rank = tail.partition(":")
        if (name == point and _matches(where, at) and (not on_rank or int(on_rank) == rank)
                and int(on_attempt or 0) == int(attempt)):
            return act
    return None


def fire(point: str, at: int | str, rank: int = 0) -> None:
    """Carry out a process-level fault (sigkill, sigterm, exit, crash) configured for this point."""
    act = action(point, at, rank)
    if act == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif act == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
    elif act == "sigint":
        os.kill(os.getpid(), signal.SIGINT)
    elif act == "exit":
        os._exit(17)
    elif act == "crash":
        raise InjectedFault(f"injected fault at {point}@{at}")
