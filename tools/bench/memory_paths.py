"""Memory and precision of paths the GPU review named, measured on CPU (the same code runs on GPU):

    python -m haina.tools.bench.memory_paths [--layers 4 --seq 256 --heads 8]

- **Attention bias copies saved for backward** (sdpa and xformers with ALiBi, bf16): bytes of the saved
  tensors whose last two dimensions are [q, k], over a forward of ``--layers`` blocks. A bias cast or
  widened per layer is saved once per layer; one shared per forward is saved once. xformers is faked
  with sdpa on CPU when it is not installed (its plumbing, not its speed, is what is measured).
- **FSDP2 gradient accumulation** (``--fsdp``): the bytes of gradient held by FSDP2 after the first of two
  micro-batches, on a fake two-rank process group (no communication), through the training loop's own
  ``_forward_backward``; with gradient sync off for accumulation FSDP2 keeps an unsharded fp32 gradient
  per parameter, with it on only the local shards.

Run it on two checkouts to compare before and after a change; the closing note of the GPU-review issue
gives both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from haina.core.config import ModelConfig
from haina.core.loss import chunked_lm_loss
from haina.core.model import Transformer


@contextmanager
def saved_tensors() -> Iterator[list[torch.Tensor]]:
    """Every tensor autograd saves for backward inside the block (the saved objects themselves)."""
    seen: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def unique_bytes(tensors: list[torch.Tensor], keep: Callable[[torch.Tensor], bool] = lambda t: True) -> int:
    """Bytes of the distinct storages behind ``tensors`` that ``keep`` selects (views count once)."""
    storages: dict[int, int] = {}
    for t in tensors:
        if keep(t) and t.device.type != "meta":
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def fake_xformers() -> types.ModuleType:
    """xformers.ops written with sdpa on CPU ([b, s, h, d] layout, tensor bias or a causal mask object)."""

    class LowerTriangularMask:
        pass

    def memory_efficient_attention(q, k, v, attn_bias=None):  # noqa: ANN001, ANN202
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        if isinstance(attn_bias, LowerTriangularMask):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)
        return out.transpose(1, 2)

    ops = types.ModuleType("xformers.ops")
    ops.LowerTriangularMask = LowerTriangularMask  # type: ignore[attr-defined]
    ops.memory_efficient_attention = memory_efficient_attention  # type: ignore[attr-defined]
    return ops


def bias_saved_bytes(
    kernel: str, layers: int = 4, seq: int = 256, heads: int = 8, batch: int = 2, device: torch.device | None = None,
) -> dict[str, int]:
    """Saved [q, k]-shaped bytes of one bf16 ALiBi forward with ``kernel``, and one bias's bf16 bytes.

    At these shapes CPU sdpa takes its flash path, which saves no [q, k] probabilities: what is counted
    is the bias."""
    device = device or torch.device("cpu")
    cfg = ModelConfig(vocab_size=256, hidden_size=16 * heads, num_layers=layers, num_heads=heads, max_seq_len=seq,
                      position="alibi", attention=kernel)
    torch.manual_seed(0)
    with device:
        model = Transformer(cfg)
    model.init_weights()
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    with saved_tensors() as seen, torch.autocast(device.type, dtype=torch.bfloat16):
        model(tokens)
    biases = unique_bytes(seen, lambda t: t.dim() >= 2 and tuple(t.shape[-2:]) == (seq, seq))
    return {"saved_bias_bytes": biases, "one_bias_bytes": heads * seq * seq * 2, "layers": layers}


def head_grad_error(device: torch.device | None = None) -> tuple[float, float]:
    """Relative error of the chunked loss's bf16 head-weight gradient over 64 chunks against fp64, and of
    a bf16 running sum over the chunks (what FSDP2's bf16 parameters used to get)."""
    device = device or torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    n, hidden, vocab, chunk = 4096, 32, 256, 64
    h = torch.randn(n, hidden, generator=g).bfloat16().to(device).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=g) * 0.1).bfloat16().to(device).requires_grad_(True)
    targets = torch.randint(0, vocab, (n,), generator=g).to(device)
    chunked_lm_loss(h, w, targets, {"cross_entropy": 1.0}, chunk).loss.backward()
    assert w.grad is not None and w.grad.dtype == torch.bfloat16
    h64, w64 = h.detach().double(), w.detach().double().requires_grad_(True)
    F.cross_entropy(h64 @ w64.T, targets).backward()
    assert w64.grad is not None
    ref, scale = w64.grad, w64.grad.abs().max()
    ours = ((w.grad.double() - ref).abs().max() / scale).item()
    probs = torch.softmax((h64 @ w64.detach().T).float(), -1)
    probs[torch.arange(n, device=device), targets] -= 1
    acc = torch.zeros(vocab, hidden, dtype=torch.bfloat16, device=device)
    for s in range(0, n, chunk):
        acc += (probs[s : s + chunk] / n).bfloat16().T @ h.detach()[s : s + chunk]
    old = ((acc.double() - ref).abs().max() / scale).item()
    return ours, old


@contextmanager
def xformers_faked() -> Iterator[None]:
    """Run the xformers kernel on CPU through :func:`fake_xformers` (restores everything after)."""
    from haina.core import attention
    from haina.plugins.model import attention_gpu

    real_available, real_check = attention.kernel_available, attention_gpu.check_runtime
    saved = {name: sys.modules.get(name) for name in ("xformers", "xformers.ops")}
    ops = fake_xformers()
    sys.modules["xformers"] = types.ModuleType("xformers")
    sys.modules["xformers.ops"] = ops
    sys.modules["xformers"].ops = ops  # type: ignore[attr-defined]
    attention.kernel_available = lambda name: True  # type: ignore[assignment]
    attention_gpu.check_runtime = lambda name, q: None  # type: ignore[assignment]
    try:
        yield
    finally:
        attention.kernel_available, attention_gpu.check_runtime = real_available, real_check  # type: ignore[assignment]
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


# ------------------------------------------------------------------------------------------- FSDP2

FSDP_CHILD = "haina.tools.bench.memory_paths"


def fsdp_accumulation_bytes() -> dict[str, int]:
    """In a child process (a fake two-rank world needs its own process group): gradient bytes FSDP2 holds
    after the first of two micro-batches of ``_forward_backward``, and the model's fp32 parameter bytes."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = subprocess.run([sys.executable, "-m", FSDP_CHILD, "--fsdp-child"], capture_output=True, text=True,
                         env=env, timeout=300, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"fsdp child failed: {out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fsdp_child() -> dict[str, int]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from haina.core.engine import Engine
    from haina.core.loss import LossOutput
    from haina.core.parallel.data_parallel import apply_fsdp
    from haina.core.train import _forward_backward

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp_shard",))
    cfg = ModelConfig(vocab_size=256, hidden_size=128, num_layers=2, num_heads=4, max_seq_len=32)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    apply_fsdp(model, mesh, bf16=True, reshard_after_forward=True)  # as training does: bf16, fp32 reduce
    param_bytes = sum(p.numel() * 4 for p in model.parameters())
    held: dict[str, int] = {}

    class Layout:
        grad_accum = 2

    engine = types.SimpleNamespace(
        layout=Layout(), device=torch.device("cpu"), autocast=torch.autocast("cpu", enabled=False),
        mark_accumulation_boundary=lambda last: Engine.mark_accumulation_boundary(engine, last),  # type: ignore[arg-type]
        parts=[model],
    )

    def forward_loss(loss_fn: Any, batch: Any) -> LossOutput:
        return loss_fn(model, batch)

    def backward(loss: torch.Tensor) -> None:
        loss.backward()
        held["bytes"] = _fsdp_grad_bytes(model)  # after the first (non-last) micro-batch

    engine.forward_loss, engine.backward = forward_loss, backward

    class Algorithm:
        @staticmethod
        def loss(m: torch.nn.Module, batch: torch.Tensor) -> LossOutput:
            value = m(batch).float().square().mean()
            return LossOutput(value, {})

    batches = [torch.randint(0, 256, (2, 32)) for _ in range(2)]
    _forward_backward(engine, Algorithm(), None, batches, ["loss"])  # type: ignore[arg-type]
    dist.destroy_process_group()
    return {"grad_bytes_after_first_microbatch": held["bytes"], "param_bytes": param_bytes}


def _fsdp_grad_bytes(model: torch.nn.Module) -> int:
    """Bytes of the local gradient shards plus FSDP2's unsharded accumulators (no-sync accumulation)."""
    from torch.distributed.fsdp import FSDPModule

    total = 0
    for p in model.parameters():
        if p.grad is not None:
            local = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            total += local.numel() * local.element_size()
    for module in model.modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            for fp in [] if group is None else group.fsdp_params:
                for acc in (getattr(fp, "unsharded_accumulated_grad", None), fp._unsharded_param.grad
                            if hasattr(fp, "_unsharded_param") else None):
                    if acc is not None:
                        total += acc.numel() * acc.element_size()
    return total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--fsdp", action="store_true", help="also the FSDP2 accumulation measurement")
    parser.add_argument("--fsdp-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fsdp_child:
        print(json.dumps(_fsdp_child()))
        return
    for kernel in ("sdpa", "xformers"):
        if kernel == "xformers":
            with xformers_faked():
                r = bias_saved_bytes(kernel, args.layers, args.seq, args.heads)
        else:
            r = bias_saved_bytes(kernel, args.layers, args.seq, args.heads)
        print(f"{kernel:<9} ALiBi bf16, {r['layers']} layers: saved bias bytes {r['saved_bias_bytes']:,} "
              f"= {r['saved_bias_bytes'] / r['one_bias_bytes']:.1f} x one bias ({r['one_bias_bytes']:,})")
    ours, old = head_grad_error()
    print(f"bf16 head-weight gradient over 64 chunks vs fp64: relative error {ours:.2e} (bf16 running sum {old:.2e})")
    if args.fsdp:
        r = fsdp_accumulation_bytes()
        print(f"FSDP2 dp_shard=2, grad_accum=2: gradient bytes held after micro-batch 1 "
              f"{r['grad_bytes_after_first_microbatch']:,} = "
              f"{r['grad_bytes_after_first_microbatch'] / r['param_bytes']:.2f} x the fp32 parameters")


if __name__ == "__main__":
    main()
