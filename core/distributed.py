"""Process-group set-up: torchrun's environment when present, else a one-process group.

Running a single process inside a (world-size 1) process group keeps one code path: megatron's dataset
builders, DCP and later the device mesh all assume torch.distributed is initialised.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

from haina.core import collectives

# NCCL's default is 10 minutes; rank 0's slowest lone work (the Megatron index build of a large corpus,
# publishing a checkpoint) can take longer while every other rank waits in a collective.
DEFAULT_TIMEOUT_S = 1800.0


def default_device() -> torch.device:
    """This rank's device: its GPU (``LOCAL_RANK``) when there is CUDA, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Idempotent: join torchrun's rendezvous (env://) or make a private world of one; collectives then
    run on ``device`` (:mod:`haina.core.collectives`) and wait at most ``timeout_s`` for a slow rank."""
    collectives.set_device(device)
    if dist.is_initialized():
        return
    backend, timeout = backend_for(device), timedelta(seconds=timeout_s)
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if restart is None:
            dist.init_process_group(backend, timeout=timeout)
            return
        # torchrun keeps one store across --max-restarts attempts: without a per-attempt prefix a
        # restarted worker reads the dead attempt's group addresses (stale keys) and cannot connect
        store, rank, world_size = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(f"attempt_{restart}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def close_distributed() -> None:
    """Leave the process group before the interpreter exits. Left to exit-time destructors, gloo's worker
    threads can be torn down while still joinable, and the process aborts ("terminate called without an
    active exception", SIGABRT) after its work is done."""
    if dist.is_initialized():
        dist.destroy_process_group()


def end_worker(code: int) -> NoReturn:
    """End a worker process whose work is done with ``code``, without the interpreter's finalisation: it
    leaves the process group (:func:`close_distributed`), waits for its non-daemon threads, runs Python's exit
    handlers and flushes the standard streams, then the process exits.
    Left to finalisation, torch's C++ objects are torn down after Python and a worker whose work succeeded
    can abort there now and then ("terminate called without an active exception", SIGABRT, at times followed
    by a segfault), which torchrun reports as a failed run; seen on a loaded machine after `haina rm-collect`
    under torchrun had written all its records."""
    import atexit
    import logging
    import sys
    import threading

    close_distributed()
    for thread in threading.enumerate():  # as an ordinary exit does, wait for the non-daemon threads
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
