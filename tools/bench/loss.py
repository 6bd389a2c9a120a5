"""Peak memory and time of the LM loss, full logits (naive) versus chunked (Baichuan's split loss).

    python -m haina.tools.bench.loss [--vocab 125696 --tokens 4096 --hidden 4096 --chunk 1024 --dtype fp32]

One forward+backward of ``naive_lm_loss`` and of ``chunked_lm_loss`` on the same random inputs
(hidden [tokens, hidden] and head weight [vocab, hidden], both fp32 and requiring grad; ``--dtype bf16``
runs under bf16 autocast, as training does). Reported peak = the most tensor memory allocated at any
moment during forward+backward *above* what was live before (the inputs); the gradients the backward
leaves in ``.grad`` count, since both variants must produce them. Because those gradients are as large
as the head weight (at the default sizes the weight gradient alone is as big as the full logits), the
bench also prints the *working* memory = peak minus the gradient bytes the step returns: the memory the
loss itself needs, which is what chunking removes.

How peak memory is measured:
- CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the step.
- CPU: ``torch.profiler`` with ``profile_memory=True`` records every allocation and free made by
  PyTorch's CPU allocator (the ``[memory]`` events, with a signed byte count); replaying them in time
  order gives the live tensor bytes at each moment and hence the exact peak. Unlike the process's RSS
  (``getrusage`` maxrss) this counts tensor memory only, is not blurred by the C allocator keeping or
  returning pages, and is deterministic. The profiler records only allocations, not op timings of
  interest here, so its overhead on the seconds-long matmuls is negligible.

The default sizes (Baichuan 2-7B: vocab 125,696, 4,096 tokens, hidden 4,096) take about two minutes per
variant on two CPU cores in fp32; CPU bf16 matmuls are far slower on CPUs without bf16 instructions,
so use small sizes for ``--dtype bf16`` there.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from haina.core.loss import LossOutput, chunked_lm_loss, naive_lm_loss

LossFn = Callable[..., LossOutput]


@dataclass
class Result:
    name: str
    peak_bytes: int
    grad_bytes: int  # bytes of hidden.grad + weight.grad, the step's unavoidable output
    seconds: float
    loss: float

    @property
    def working_bytes(self) -> int:
        return self.peak_bytes - self.grad_bytes


def cpu_peak_bytes(fn: Callable[[], object]) -> tuple[int, object]:
    """Run ``fn`` under the profiler; the peak of live CPU tensor bytes allocated during it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type().name == "CPU"
    ]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak, result


def measure(
    name: str,
    fn: LossFn,
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    terms: dict[str, float],
    chunk: int,
    autocast_dtype: torch.dtype | None,
) -> Result:
    """One forward+backward of ``fn``: its peak extra memory, wall time and loss value."""
    hidden.grad = None
    weight.grad = None
    gc.collect()
    device_type = hidden.device.type

    def step() -> float:
        with torch.autocast(
            device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
        ):
            out = fn(hidden, weight, targets, terms, chunk)
        out.loss.backward()
        return float(out.loss.detach())

    if device_type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() - base
    else:
        start = time.perf_counter()
        peak, loss_obj = cpu_peak_bytes(step)
        seconds = time.perf_counter() - start
        loss = float(loss_obj)  # type: ignore[arg-type]
    grad_bytes = sum(t.grad.numel() * t.grad.element_size() for t in (hidden, weight) if t.grad is not None)
    hidden.grad = None
    weight.grad = None
    return Result(name, peak, grad_bytes, seconds, loss)


def parse_terms(text: str) -> dict[str, float]:
    """``cross_entropy=1,max_z=2e-4`` -> {"cross_entropy": 1.0, "max_z": 0.0002}."""
    terms: dict[str, float] = {}
    for item in filter(None, text.split(",")):
        name, _, coef = item.partition("=")
        terms[name.strip()] = float(coef) if coef else 1.0
    return terms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m haina.tools.bench.loss", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--vocab", type=int, default=125_696)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = bf16 autocast")
    parser.add_argument(
        "--terms", default="cross_entropy=1,max_z=2e-4", help="name=coef,... (Baichuan 2 default)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    terms = parse_terms(args.terms)
    autocast_dtype = torch.bfloat16 if args.dtype == "bf16" else None
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    hidden = torch.randn(args.tokens, args.hidden, generator=gen).to(device).requires_grad_(True)
    weight = (
        (torch.randn(args.vocab, args.hidden, generator=gen) * args.hidden**-0.5)
        .to(device)
        .requires_grad_(True)
    )
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=gen).to(device)

    mib = 2.0**20
    print(
        f"loss bench: vocab={args.vocab} tokens={args.tokens} hidden={args.hidden} chunk={args.chunk} "
        f"dtype={args.dtype} device={device} threads={torch.get_num_threads()} terms={terms}"
    )
    print(
        f"  sizes (fp32): logits {args.tokens * args.vocab * 4 / mib:,.0f} MiB, "
        f"weight {args.vocab * args.hidden * 4 / mib:,.0f} MiB, hidden {args.tokens * args.hidden * 4 / mib:,.0f} MiB"
    )
    results = []
    for name, fn in (("naive", naive_lm_loss), ("chunked", chunked_lm_loss)):
        res = measure(name, fn, hidden, weight, targets, terms, args.chunk, autocast_dtype)
        results.append(res)
        print(
            f"  {res.name:8s} peak {res.peak_bytes / mib:8,.0f} MiB   working (peak - grads) "
            f"{res.working_bytes / mib:8,.0f} MiB   time {res.seconds:8.2f} s   loss {res.loss:.6f}"
        )
    naive, chunked = results
    print(
        f"  ratio chunked/naive: peak {chunked.peak_bytes / naive.peak_bytes:.3f}   "
        f"working {chunked.working_bytes / max(naive.working_bytes, 1):.3f}   time {chunked.seconds / naive.seconds:.3f}   |loss diff| {abs(chunked.loss - naive.loss):.2e}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
