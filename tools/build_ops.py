"""Build DeepSpeed's CPU Adam op once, at install (``make setup``), instead of in the first offloaded run.

DeepSpeed JIT-compiles its C++ ops into torch's extension cache the first time a process needs them; the
build is keyed by the virtual environment's paths, so every new environment pays it again (about 40 s on
two cores) inside whichever run first offloads optimizer states, with every rank waiting on one lock.
Building at install is what DeepSpeed advises for production; here it is one call, and a no-op when
DeepSpeed is absent or the op is already built.
"""

from __future__ import annotations

import time

import torch

from haina.core.parallel.zero_state import import_deepspeed


def main() -> None:
    try:
        import_deepspeed(torch.device("cpu"))
    except RuntimeError as exc:
        print(f"build_ops: skipped ({exc})")
        return
    from deepspeed.ops.op_builder import CPUAdamBuilder

    start = time.perf_counter()
    CPUAdamBuilder().load(verbose=False)
    print(f"build_ops: DeepSpeed CPU Adam ready ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
