"""Per-token log-probabilities and entropy from hidden states in chunks (haina.plugins.align.token_logprobs)
against full logits: values and gradients, temperature, a padded vocabulary, ignored rows, bf16, a model,
and the vocabulary-parallel path on two processes."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from haina.core.config import load_config
from haina.core.model import build_model
from haina.plugins.align.common import IGNORE, shifted_targets, token_logps
from haina.plugins.align.token_logprobs import chunked_token_logps, model_token_logps
from tests.parallel_helpers import gloo_rank


def reference(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and entropy from the full [N, V] logits, 0 at ignored rows."""
    logits = (hidden @ weight[:limit].T).float() / temperature  # ids past the limit are not in the vocabulary
    logp_all = torch.log_softmax(logits, dim=-1)
    valid = targets != IGNORE
    logp = logp_all.gather(1, targets.clamp(min=0)[:, None])[:, 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return torch.where(valid, logp, 0.0), torch.where(valid, entropy, 0.0)


def _inputs(
    n: int = 13, h: int = 8, v: int = 37, seed: int = 0, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64)
    targets = torch.randint(0, limit or v, (n,), generator=g)
    targets[[1, 5, 6]] = IGNORE
    return hidden, weight, targets


@pytest.mark.parametrize("chunk", [1, 4, 64])
@pytest.mark.parametrize(("temperature", "limit"), [(1.0, None), (0.7, 30)])
def test_values_and_gradients_match_full_logits(chunk: int, temperature: float, limit: int | None) -> None:
    hidden, weight, targets = _inputs(limit=limit)
    a_h, a_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b_h, b_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = chunked_token_logps(a_h, a_w, targets, chunk, temperature=temperature, vocab_limit=limit, entropy=True)
    logp, entropy = reference(b_h, b_w, targets, temperature, limit)
    torch.testing.assert_close(out.logp, logp.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.entropy, entropy.float(), rtol=1e-6, atol=1e-6)
    # an arbitrary loss of both outputs: the gradients flow through log-prob and entropy alike
    g = torch.Generator().manual_seed(1)
    u, w = torch.randn(len(targets), generator=g), torch.randn(len(targets), generator=g)
    ((out.logp * u).sum() + (out.entropy * w).sum()).backward()
    ((logp * u).sum() + (entropy * w).sum()).backward()
    torch.testing.assert_close(a_h.grad, b_h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a_w.grad, b_w.grad, rtol=1e-5, atol=1e-6)


def test_ignored_rows_get_zero_and_no_gradient() -> None:
    hidden, weight, targets = _inputs()
    h = hidden.clone().requires_grad_()
    out = chunked_token_logps(h, weight, targets, 4)
    assert out.entropy is None
    assert (out.logp[targets == IGNORE] == 0).all() and (out.logp[targets != IGNORE] < 0).all()
    out.logp.sum().backward()
    assert (h.grad[targets == IGNORE] == 0).all() and (h.grad[targets != IGNORE] != 0).any()
    nothing = chunked_token_logps(h, weight, torch.full_like(targets, IGNORE), 4, entropy=True)
    assert (nothing.logp == 0).all() and (nothing.entropy == 0).all()


def test_log_prob_only_gradient_matches_cross_entropy() -> None:
    """The common case (no entropy gradient) against autograd through F.cross_entropy."""
    hidden, weight, targets = _inputs(n=20, v=50, seed=3)
    a = hidden.clone().requires_grad_()
    b = hidden.clone().requires_grad_()
    chunked_token_logps(a, weight, targets, 6).logp.sum().backward()
    token_logps((b @ weight.T)[None], targets[None]).sum().backward()  # fp32 softmax: fp32 tolerance
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_backward_keeps_no_logits() -> None:
    """What autograd saves for the backward: the inputs and [N] row statistics, nothing of [N, V]."""
    hidden, weight, targets = _inputs(n=64, h=8, v=1000, seed=2)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = chunked_token_logps(h, w, targets, 16, entropy=True)
    (out.logp.sum() + out.entropy.sum()).backward()
    assert saved and max(saved) == weight.numel()  # [V, H] = 8,000; the logits would be [N, V] = 61,000
    assert h.grad is not None and w.grad is not None


def test_bf16_autocast_runs_matmuls_in_bf16_and_math_in_fp32() -> None:
    hidden, weight, targets = (t.float() if t.is_floating_point() else t for t in _inputs(n=32, h=16, v=64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = chunked_token_logps(hidden, weight, targets, 8, entropy=True)
    assert out.logp.dtype == torch.float32
    logp, entropy = reference(hidden.bfloat16().float(), weight.bfloat16().float(), targets)
    torch.testing.assert_close(out.logp, logp, rtol=0.05, atol=0.05)
    torch.testing.assert_close(out.entropy, entropy, rtol=0.05, atol=0.05)


def test_model_log_probs_match_the_heads_full_logits() -> None:
    """On the tiny Transformer with Baichuan's NormHead: the same numbers as PPO's old full-logits path,
    gradients included, and a padded vocabulary kept out of the distribution."""
    cfg = load_config("tiny")
    model = build_model(cfg, torch.device("cpu"))
    tokens = torch.randint(3, 400, (3, 12), generator=torch.Generator().manual_seed(0))
    response = torch.zeros_like(tokens, dtype=torch.bool)
    response[:, 5:] = True
    response[2, 9:] = False
    targets = shifted_targets(tokens, response)
    out = model_token_logps(model, tokens, targets, chunk_size=5, entropy=True)
    out.logp.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    full = token_logps(model(tokens, logits=slice(None)), targets)
    full.sum().backward()
    torch.testing.assert_close(out.logp, full, rtol=1e-5, atol=1e-5)
    # chunked and whole sums add in different orders: float32 rounding is measured against each tensor's scale
    # (seen: 6e-7 of it on one CPU, where an element-wise atol of 1e-6 failed), a wrong gradient is off by all of it
    for got, want in zip(grads, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    limited = model_token_logps(model, tokens, targets, chunk_size=5, vocab_limit=400)
    logits = model(tokens, logits=slice(None)).float()
    logits[..., 400:] = float("-inf")
    torch.testing.assert_close(limited.logp, token_logps(logits, targets), rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_refused() -> None:
    hidden, weight, targets = _inputs()
    with pytest.raises(ValueError, match="shape mismatch"):
        chunked_token_logps(hidden, weight[:, :4], targets)
    with pytest.raises(ValueError, match="positive"):
        chunked_token_logps(hidden, weight, targets, 0)


# ------------------------------------------------------------------------- vocabulary parallel (tp = 2)

def _tp_worker(rank: int, world: int, port: int, out: str) -> None:
    with gloo_rank(rank, world, port):
        hidden, weight, targets = _inputs(n=11, h=6, v=40, seed=5, limit=33)
        rows = weight.shape[0] // world
        h = hidden.clone().requires_grad_()
        w = weight[rank * rows : (rank + 1) * rows].clone().requires_grad_()
        got = chunked_token_logps(
            h, w, targets, 3, temperature=0.8, vocab_limit=33, entropy=True, tp_group=dist.group.WORLD,
            vocab_start=rank * rows,
        )
        (got.logp.sum() + 0.5 * got.entropy.sum()).backward()
        torch.save({"logp": got.logp, "entropy": got.entropy, "grad_h": h.grad, "grad_w": w.grad}, f"{out}/{rank}.pt")


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_vocabulary_parallel_matches_one_process(tmp_path: Path) -> None:
    """Two ranks, each with half the head's rows (the second partly past the vocabulary limit): the same
    log-probs and entropies on both, the full hidden gradient on both, each its own rows' weight gradient."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_tp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    hidden, weight, targets = _inputs(n=11, h=6, v=40, seed=5, limit=33)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, entropy = reference(h, w, targets, 0.8, 33)
    (logp.sum() + 0.5 * entropy.sum()).backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        torch.testing.assert_close(got["logp"], logp.float(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got["entropy"], entropy.float(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got["grad_h"], h.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["grad_w"], w.grad[rank * 20 : (rank + 1) * 20], rtol=1e-5, atol=1e-6)
