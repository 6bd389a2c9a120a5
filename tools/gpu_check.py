"""One-command GPU check of the attention kernels: MFU and peak memory per kernel, eager and with
torch.compile, kernel-vs-sdpa parity, and the review checks. Under 5 minutes from cold on one H100/H200.

    python -m haina.tools.gpu_check                 # ~1B Baichuan-style model, seq 4096, bf16
    python -m haina.tools.gpu_check --quick         # under 2 minutes: 4 layers, seq 2048, no compiled rows
    python -m haina.tools.gpu_check --dry-run       # CPU: FLOP count and table layout only, no GPU

Time goes to compiling: every compiled row compiles a block graph (most of a minute), so by default only
the fastest usable kernel gets a compiled row (``--compile-all`` for every kernel). One model is alive at a
time: each row frees its model, optimizer and compiled graphs (a compiled block's forward refers to the
block, a cycle only the garbage collector breaks) before the next row's peak memory is reset. Flex on
CUDA always runs its compiled kernel (eager flex materialises the scores), so its "eager" row says so.

Review checks (``--no-review`` skips them), in one process on one GPU: a checkpoint verified and a
perplexity-style sum reduced through a process group of one on the GPU's backend (collectives on the
group's device), the bf16 head-weight gradient against an fp64 reference, and the attention-bias bytes
saved for backward with ALiBi (one copy for all layers).

Model: hidden 2048, 16 layers, 16 heads, Baichuan vocabulary (125,696), SwiGLU, RMSNorm, NormHead, RoPE
(ALiBi with ``--position alibi``); one micro-batch of 4096 tokens, bf16 autocast over fp32 master weights,
fused AdamW, the chunked vocabulary loss: a real training step. Every available kernel (flash, flex,
xformers, sdpa; unavailable ones are listed with the reason) runs ``--warmup`` + ``--steps`` steps eagerly
and with ``parallel.compile`` (per-block torch.compile). MFU = model FLOPs (haina.core.metrics, causal
attention counted half) x tokens/s / the device's dense bf16 peak.

Parity: a small model in bf16 with packed documents (segment ids) and ALiBi, and with RoPE, is run with
each kernel and with sdpa from the same weights; the largest relative difference of the output and of
the gradients is printed (bf16 tolerance: < 2e-2).
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from haina.core.attention import position_bias_kind, unsuitable
from haina.core.config import ModelConfig, OptimConfig
from haina.core.loss import chunked_lm_loss
from haina.core.metrics import peak_tflops_of, training_flops_per_token
from haina.core.model import Transformer
from haina.core.optim import build_optimizer
from haina.core.parallel.compile import apply_compile

KERNEL_ORDER: tuple[str, ...] = ("flash", "flex", "xformers", "sdpa")


@dataclass
class Row:
    kernel: str
    compiled: bool
    step_s: float | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    peak_gib: float | None = None
    note: str = ""


def model_config(position: str = "rope", attention: str = "sdpa", layers: int = 16, seq: int = 4096) -> ModelConfig:
    """The ~1B Baichuan-style model of the check (1.3B parameters with the 125,696-row embedding and head)."""
    return ModelConfig(
        vocab_size=125696, hidden_size=2048, num_layers=layers, num_heads=16, max_seq_len=seq,
        position=position, attention=attention,
    )


def mfu(flops_per_token: float, tokens_per_s: float, peak_tflops: float) -> float:
    """Model FLOPs utilization: achieved model FLOP/s over the device's peak."""
    return flops_per_token * tokens_per_s / (peak_tflops * 1e12)


def format_table(rows: Sequence[Row]) -> str:
    """Fixed-width table, one row per kernel x compile; missing numbers as '-'."""
    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    head = f"{'kernel':<9}{'compile':<9}{'step s':>9}{'tokens/s':>11}{'MFU %':>8}{'peak GiB':>10}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.kernel:<9}{'yes' if r.compiled else 'no':<9}{num(r.step_s, '.3f'):>9}"
            f"{num(r.tokens_per_s, ',.0f'):>11}{num(None if r.mfu is None else 100 * r.mfu, '.1f'):>8}"
            f"{num(r.peak_gib, '.1f'):>10}  {r.note}"
        )
    return "\n".join(lines)


def planned_rows(wanted: Sequence[str], usable: Sequence[str], args: argparse.Namespace) -> list[tuple[str, bool]]:
    """(kernel, compiled) rows to run: every wanted kernel eagerly, and compiled the first usable one (or
    every one with ``--compile-all``; none with ``--no-compile`` or ``--quick``)."""
    rows = [(k, False) for k in wanted]
    if not args.no_compile:
        compiled = [k for k in wanted if k in usable]
        rows += [(k, True) for k in (compiled if args.compile_all else compiled[:1])]
    return rows


def available_kernels(position: str, device: str, dtype: torch.dtype) -> tuple[list[str], dict[str, str]]:
    """Kernels that can run here, and the reason for each that cannot."""
    usable, skipped = [], {}
    for name in KERNEL_ORDER:
        why = unsuitable(name, position_bias_kind(position), device, dtype)
        if why is None:
            usable.append(name)
        else:
            skipped[name] = why
    return usable, skipped


def free_cuda() -> None:
    """Drop compiled graphs and collect cycles so the next row starts from an empty device."""
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def measure(kernel: str, compiled: bool, args: argparse.Namespace, peak: float) -> Row:
    """Train ``args.warmup + args.steps`` steps of the 1B model with ``kernel``; time the last ones. The
    work runs in its own frame so that nothing of it is referenced when the device is emptied."""
    try:
        return _measure(kernel, compiled, args, peak)
    finally:
        free_cuda()


def _measure(kernel: str, compiled: bool, args: argparse.Namespace, peak: float) -> Row:
    device = torch.device("cuda")
    free_cuda()
    torch.cuda.reset_peak_memory_stats(device)
    cfg = model_config(args.position, kernel, args.layers, args.seq)
    with device:
        model = Transformer(cfg)
    model.init_weights()
    if compiled:
        apply_compile(model)
    optim = build_optimizer(model, OptimConfig(warmup_steps=0))
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)
    labels = torch.roll(tokens, -1, dims=1)
    terms = {"cross_entropy": 1.0, "max_z": 2e-4}

    def step() -> None:
        optim.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hidden = model(tokens)
            out = chunked_lm_loss(hidden.flatten(0, 1), model.head.effective_weight(), labels.flatten(), terms, 1024)
        out.loss.backward()
        optim.step()

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - start) / args.steps
    tps = args.batch * args.seq / step_s
    note = "flex kernel compiled (always on CUDA), blocks eager" if kernel == "flex" and not compiled else ""
    row = Row(kernel, compiled, step_s, tps, mfu(training_flops_per_token(cfg, args.seq), tps, peak),
              torch.cuda.max_memory_allocated(device) / 2**30, note)
    return row  # the model, optimizer and graphs die with this frame; measure() then collects them


def parity(kernel: str, position: str) -> float:
    """Largest relative difference (output and gradients) between ``kernel`` and sdpa on packed documents."""
    device = torch.device("cuda")
    cfg = ModelConfig(vocab_size=1024, hidden_size=512, num_layers=2, num_heads=8, max_seq_len=512,
                      position=position, attention="sdpa")
    torch.manual_seed(0)
    with device:
        ref = Transformer(cfg)
        other = Transformer(cfg.model_copy(update={"attention": kernel}))
    ref.init_weights()
    other.load_state_dict(ref.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (2, 512), device=device)
    segments = torch.ones_like(tokens)
    segments[0, 200:] = 2
    segments[1, 300:450] = 2
    segments[1, 450:] = 0
    keep = (segments != 0)[..., None]
    diffs = []
    outs = []
    for model in (ref, other):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(tokens, segments=segments).float() * keep
        out.square().mean().backward()
        outs.append(out)
    diffs.append(((outs[0] - outs[1]).abs().max() / outs[0].abs().max()).item())
    for a, b in zip(ref.parameters(), other.parameters(), strict=True):
        if a.grad is not None and a.grad.abs().max() > 0:
            diffs.append(((a.grad - b.grad).abs().max() / a.grad.abs().max()).item())
    del ref, other, outs
    free_cuda()
    return max(diffs)


def review_checks(device: torch.device) -> list[tuple[str, str, bool]]:
    """(what, measured, ok) for the review rows that one device can show (the tests run them on CPU)."""
    from haina.core import collectives
    from haina.core.checkpoint import TrainerState, save_checkpoint, verify
    from haina.core.distributed import init_distributed
    from haina.tools.bench.memory_paths import bias_saved_bytes, head_grad_error

    results: list[tuple[str, str, bool]] = []

    def check(what: str, fn: Any) -> None:
        try:
            measured, ok = fn()
        except Exception as exc:  # one failing check must not hide the others
            measured, ok = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}", False
        results.append((what, measured, ok))
        print(f"  {'ok  ' if ok else 'FAIL'} {what}: {measured}", flush=True)

    created = not torch.distributed.is_initialized()
    init_distributed(device)
    backend = torch.distributed.get_backend()

    def resume_verify() -> tuple[str, bool]:
        with tempfile.TemporaryDirectory() as tmp:
            model = torch.nn.Linear(8, 8, device=device)
            verify(save_checkpoint(Path(tmp), model, [], TrainerState(step=1)))
        return f"checkpoint saved and verified on {backend}", True

    def ppl_sum() -> tuple[str, bool]:
        sums = collectives.reduce_values(torch.tensor([[1.5, 4.0]], dtype=torch.float64))
        return f"sums reduced on {backend}: {sums.tolist()}", sums.tolist() == [[1.5, 4.0]]

    def head_grad() -> tuple[str, bool]:
        ours, old = head_grad_error(device)
        return f"relative error {ours:.2e} (bf16 running sum: {old:.2e})", ours < 8e-3

    def bias_bytes() -> tuple[str, bool]:
        r = bias_saved_bytes("sdpa", layers=4, device=device)
        ratio = r["saved_bias_bytes"] / r["one_bias_bytes"]
        return f"sdpa ALiBi bf16, 4 layers: {ratio:.1f} x one bias saved", ratio <= 1.0

    check("row 1: checkpoint verify (collective on the group's device)", resume_verify)
    check("row 2: perplexity sums (collective on the group's device)", ppl_sum)
    check("row 8: bf16 head-weight gradient vs fp64", head_grad)
    check("row 10: attention bias saved once for all layers", bias_bytes)
    if created:
        torch.distributed.destroy_process_group()
    if device.type == "cuda":
        free_cuda()
    return results


def main(argv: Sequence[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--position", default="rope", choices=("rope", "alibi"))
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--kernels", default=",".join(KERNEL_ORDER), help="comma-separated subset")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled rows")
    parser.add_argument("--compile-all", action="store_true", help="a compiled row for every kernel, not only the first")
    parser.add_argument("--quick", action="store_true", help="under 2 minutes: 4 layers, seq 2048, 1+2 steps, eager only")
    parser.add_argument("--no-parity", action="store_true")
    parser.add_argument("--no-review", action="store_true", help="skip the review checks")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: print the FLOP count and an empty table")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.seq, args.warmup, args.steps, args.no_compile = 4, 2048, 1, 2, True

    cfg = model_config(args.position, "sdpa", args.layers, args.seq)
    fpt = training_flops_per_token(cfg, args.seq)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in Transformer(cfg).parameters())
    print(f"model: {n_params / 1e9:.2f}B parameters, seq {args.seq}, {fpt / 1e9:.1f} GFLOP per token (fwd+bwd)")
    wanted = [k for k in args.kernels.split(",") if k]
    if args.dry_run or not torch.cuda.is_available():
        if not args.dry_run:
            print("no CUDA device: nothing measured (use --dry-run on CPU)")
        rows = [Row(k, c, note="dry run") for k, c in planned_rows(wanted, wanted, args)]
        print(format_table(rows))
        return rows

    name = torch.cuda.get_device_name()
    peak = peak_tflops_of(name) or 989.0
    print(f"device: {name}, peak {peak:.0f} bf16 TFLOPS, torch {torch.__version__}")
    usable, skipped = available_kernels(args.position, "cuda", torch.bfloat16)
    rows: list[Row] = []
    for kernel, compiled in planned_rows(wanted, usable, args):
        if kernel not in usable:
            rows.append(Row(kernel, compiled, note=f"skipped: {skipped.get(kernel, 'unknown kernel')}"))
            continue
        try:
            rows.append(measure(kernel, compiled, args, peak))
        except Exception as exc:  # one failing kernel must not hide the others' numbers
            rows.append(Row(kernel, compiled, note=f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"))
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(format_table(rows))
    if not args.no_review:
        print("\nreview checks (one GPU, a process group of one):")
        review_checks(torch.device("cuda", torch.cuda.current_device()))
    if not args.no_parity:
        print("\nparity vs sdpa (max relative diff of output and grads, bf16, packed documents):")
        for kernel in usable:
            if kernel == "sdpa":
                continue
            for position in ("rope", "alibi"):
                try:
                    diff = parity(kernel, position)
                    verdict = "ok" if diff < 2e-2 else "MISMATCH"
                    print(f"  {kernel:<9}{position:<6} {diff:.2e}  {verdict}")
                except Exception as exc:
                    print(f"  {kernel:<9}{position:<6} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
    return rows


if __name__ == "__main__":
    main()
