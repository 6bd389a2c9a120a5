"""Loss terms and the chunked LM loss: values, gradients, mixed precision and the memory promise."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from haina.core import registry
from haina.core.loss import LossOutput, chunked_lm_loss, naive_lm_loss

ALL_TERMS = {"cross_entropy": 1.0, "max_z": 2e-4, "z_loss": 1e-3}


def make_inputs(n: int = 40, h: int = 24, v: int = 97, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * 0.5
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::3] = -100
    return hidden, weight, targets


def run(fn, hidden: Tensor, weight: Tensor, targets: Tensor, terms: dict[str, float], chunk: int):
    """Loss output plus gradients w.r.t. fresh leaf copies of hidden and weight."""
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = fn(h, w, targets, terms, chunk)
    out.loss.backward()
    return out, h.grad, w.grad


def test_terms_are_registered_with_metrics() -> None:
    expected = {"cross_entropy": "lm_loss", "max_z": "max_z_loss", "z_loss": "z_loss"}
    for name, metric in expected.items():
        term = registry.get("loss", name)()
        assert term.metric == metric
        assert term.per_token(torch.randn(3, 5), torch.tensor([0, 1, 4])).shape == (3,)


@pytest.mark.parametrize("chunk", [1, 7, 16, 40, 64])
def test_chunked_matches_naive_fp32(chunk: int) -> None:
    hidden, weight, targets = make_inputs()
    ref, ref_h, ref_w = run(naive_lm_loss, hidden, weight, targets, ALL_TERMS, chunk)
    out, out_h, out_w = run(chunked_lm_loss, hidden, weight, targets, ALL_TERMS, chunk)
    assert isinstance(out, LossOutput)
    assert abs(out.loss.item() - ref.loss.item()) < 1e-5
    assert set(out.parts) == {"lm_loss", "max_z_loss", "z_loss"}
    for key in ref.parts:
        assert abs(out.parts[key].item() - ref.parts[key].item()) < 1e-5
        assert not out.parts[key].requires_grad
    assert torch.allclose(sum(out.parts.values()), out.loss.detach(), atol=1e-6)
    assert torch.allclose(out_h, ref_h, atol=1e-5, rtol=0)
    assert torch.allclose(out_w, ref_w, atol=1e-5, rtol=0)
    assert ref_h.abs().max() > 1e-3 and ref_w.abs().max() > 1e-3  # the comparison is not between zeros


def test_backward_scales_by_upstream_gradient() -> None:
    hidden, weight, targets = make_inputs(seed=8)
    grads = []
    for fn in (naive_lm_loss, chunked_lm_loss):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        (-2.5 * fn(h, w, targets, ALL_TERMS, 16).loss).backward()
        grads.append((h.grad, w.grad))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5, rtol=0)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-5, rtol=0)


def identity_head(logits: Tensor) -> tuple[Tensor, Tensor]:
    """hidden = logits, weight = I: the loss sees exactly ``logits`` and d/dhidden = d/dlogits."""
    return logits.clone().requires_grad_(True), torch.eye(logits.shape[1])


@pytest.mark.parametrize("fn", [naive_lm_loss, chunked_lm_loss])
def test_max_z_by_hand(fn) -> None:
    # Row maxima 3 and 2 (not the -4 of larger magnitude): value 2e-4 * (3^2 + 2^2) / 2.
    hidden, weight = identity_head(torch.tensor([[1.0, 3.0, -2.0], [0.5, -4.0, 2.0]]))
    out = fn(hidden, weight, torch.tensor([0, 1]), {"max_z": 2e-4}, 1)
    assert out.loss.item() == pytest.approx(2e-4 * (9 + 4) / 2, rel=1e-6)
    assert out.parts["max_z_loss"].item() == pytest.approx(1.3e-3, rel=1e-6)
    out.loss.backward()
    # d/dmax of 2e-4 * mean(max^2) = 2 * 2e-4 * max / n at the max, 0 elsewhere.
    expected = torch.tensor([[0.0, 2 * 2e-4 * 3 / 2, 0.0], [0.0, 0.0, 2 * 2e-4 * 2 / 2]])
    assert torch.allclose(hidden.grad, expected, atol=1e-9, rtol=1e-6)


@pytest.mark.parametrize("fn", [naive_lm_loss, chunked_lm_loss])
def test_z_loss_is_logsumexp_squared(fn) -> None:
    logits = torch.randn(6, 11, generator=torch.Generator().manual_seed(1)) * 3
    targets = torch.tensor([0, -100, 2, 3, 10, 5])
    hidden, weight = identity_head(logits)
    out = fn(hidden, weight, targets, {"z_loss": 1e-2}, 4)
    out.loss.backward()
    lse_ref = logits.clone().requires_grad_(True)
    valid = targets != -100
    ref = 1e-2 * torch.logsumexp(lse_ref, dim=-1)[valid].square().mean()
    ref.backward()
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(hidden.grad, lse_ref.grad, atol=1e-7)
    assert hidden.grad[1].abs().max() == 0  # ignored position


def test_cross_entropy_matches_torch_with_ignore_index() -> None:
    logits = torch.randn(9, 13, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([1, -100, 12, 0, -100, 5, 5, 7, 3])
    hidden, weight = identity_head(logits)
    out = chunked_lm_loss(hidden, weight, targets, {"cross_entropy": 1.0}, 4)
    out.loss.backward()
    ref_logits = logits.clone().requires_grad_(True)
    ref = F.cross_entropy(ref_logits, targets, ignore_index=-100)
    ref.backward()
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(hidden.grad, ref_logits.grad, atol=1e-7)


def test_gradient_flows_through_normalized_weight() -> None:
    hidden, raw, targets = make_inputs(seed=3)
    grads = []
    for fn in (naive_lm_loss, chunked_lm_loss):
        w_raw = raw.clone().requires_grad_(True)
        weight = F.normalize(w_raw, dim=1)  # NormHead
        fn(hidden, weight, targets, ALL_TERMS, 8).loss.backward()
        grads.append(w_raw.grad)
    assert grads[1] is not None and grads[1].abs().max() > 1e-4
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=0)


def test_bf16_autocast_runs_and_is_close_to_fp32() -> None:
    hidden, weight, targets = make_inputs(n=32, h=16, v=64, seed=4)
    ref, ref_h, ref_w = run(chunked_lm_loss, hidden, weight, targets, ALL_TERMS, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, out_h, out_w = run(chunked_lm_loss, hidden, weight, targets, ALL_TERMS, 8)
        naive, _, _ = run(naive_lm_loss, hidden, weight, targets, ALL_TERMS, 8)
    assert out.loss.dtype == torch.float32
    assert out_h.dtype == torch.float32 and out_w.dtype == torch.float32
    assert torch.isfinite(out.loss)
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=2e-2)
    assert out.loss.item() == pytest.approx(naive.loss.item(), rel=2e-2)
    assert ((out_h - ref_h).norm() / ref_h.norm()).item() < 5e-2
    assert ((out_w - ref_w).norm() / ref_w.norm()).item() < 5e-2


def test_bf16_weights_give_bf16_grads() -> None:
    hidden, weight, targets = make_inputs(n=16, h=8, v=32, seed=5)
    out, out_h, out_w = run(chunked_lm_loss, hidden.bfloat16(), weight.bfloat16(), targets, ALL_TERMS, 5)
    ref, ref_h, ref_w = run(chunked_lm_loss, hidden, weight, targets, ALL_TERMS, 5)
    assert out_h.dtype == torch.bfloat16 and out_w.dtype == torch.bfloat16
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=2e-2)
    assert ((out_w.float() - ref_w).norm() / ref_w.norm()).item() < 5e-2


@pytest.mark.parametrize("fn", [naive_lm_loss, chunked_lm_loss])
def test_all_ignored_gives_zero_without_nan(fn) -> None:
    hidden, weight, _ = make_inputs(n=10)
    targets = torch.full((10,), -100)
    out, gh, gw = run(fn, hidden, weight, targets, ALL_TERMS, 3)
    assert out.loss.item() == 0.0
    assert all(p.item() == 0.0 for p in out.parts.values())
    assert torch.all(gh == 0) and torch.all(gw == 0)


def test_no_grad_and_frozen_inputs_skip_gradient_work() -> None:
    hidden, weight, targets = make_inputs()
    ref = naive_lm_loss(hidden, weight, targets, ALL_TERMS)
    out = chunked_lm_loss(hidden, weight, targets, ALL_TERMS, 9)
    assert out.loss.grad_fn is None
    assert out.loss.item() == pytest.approx(ref.loss.item(), abs=1e-5)
    h = hidden.clone().requires_grad_(True)
    with torch.no_grad():
        assert chunked_lm_loss(h, weight, targets, ALL_TERMS, 9).loss.grad_fn is None
    frozen_weight = chunked_lm_loss(h, weight, targets, ALL_TERMS, 9)
    assert frozen_weight.loss.grad_fn.grads[1] is None  # no weight-sized buffer was made
    frozen_weight.loss.backward()
    assert h.grad is not None


def test_third_party_term_without_fused_path() -> None:
    @registry.register("loss", "test_softmax_sq")
    class SoftmaxSquare:
        metric: ClassVar[str] = "softmax_sq"

        def per_token(self, logits: Tensor, targets: Tensor) -> Tensor:
            return logits.softmax(-1).square().sum(-1) + 0.1 * logits.gather(-1, targets[:, None])[:, 0]

    terms = {"cross_entropy": 1.0, "test_softmax_sq": 0.5}
    hidden, weight, targets = make_inputs(seed=6)
    ref, ref_h, ref_w = run(naive_lm_loss, hidden, weight, targets, terms, 7)
    out, out_h, out_w = run(chunked_lm_loss, hidden, weight, targets, terms, 7)
    assert list(out.parts) == ["lm_loss", "softmax_sq"]
    assert out.parts["softmax_sq"].item() == pytest.approx(ref.parts["softmax_sq"].item(), abs=1e-6)
    assert torch.allclose(out_h, ref_h, atol=1e-5, rtol=0)
    assert torch.allclose(out_w, ref_w, atol=1e-5, rtol=0)


def test_bad_arguments_fail_clearly() -> None:
    hidden, weight, targets = make_inputs()
    with pytest.raises(registry.PluginError, match="cross_entropy"):
        chunked_lm_loss(hidden, weight, targets, {"nope": 1.0}, 8)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_lm_loss(hidden, weight, targets, ALL_TERMS, 0)
    with pytest.raises(ValueError, match="shape"):
        chunked_lm_loss(hidden, weight[:, :-1], targets, ALL_TERMS, 8)


# --- the memory promise: no [N x V] tensor in forward or backward -------------------------------------

N, H, V, CHUNK = 256, 16, 2048, 32  # N*V is far above both V*H and CHUNK*V


def memory_inputs() -> tuple[Tensor, Tensor, Tensor]:
    hidden, weight, targets = make_inputs(n=N, h=H, v=V, seed=7)
    return hidden.requires_grad_(True), weight.requires_grad_(True), targets


@pytest.mark.parametrize("fn", [naive_lm_loss, chunked_lm_loss])
def test_no_full_logits_saved_for_backward(fn) -> None:
    saved: list[int] = []

    def pack(t: Tensor) -> Tensor:
        saved.append(t.numel())
        return t

    hidden, weight, targets = memory_inputs()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(hidden, weight, targets, {"cross_entropy": 1.0, "max_z": 2e-4}, CHUNK)
    out.loss.backward()
    if fn is naive_lm_loss:
        assert max(saved) >= N * V
    else:
        assert max(saved, default=0) < N * V


class LargestOutput(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for item in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(item, Tensor):
                self.largest = max(self.largest, item.numel())
        return result


@pytest.mark.parametrize("fn", [naive_lm_loss, chunked_lm_loss])
def test_no_op_produces_full_logits(fn) -> None:
    hidden, weight, targets = memory_inputs()
    with LargestOutput() as mode:
        out = fn(hidden, weight, targets, ALL_TERMS, CHUNK)
        out.loss.backward()
    if fn is naive_lm_loss:
        assert mode.largest >= N * V
    else:
        assert mode.largest <= CHUNK * V


def test_chunked_peak_memory_is_a_fraction_of_naive() -> None:
    from haina.tools.bench.loss import cpu_peak_bytes

    peaks = {}
    for fn in (naive_lm_loss, chunked_lm_loss):
        hidden, weight, targets = memory_inputs()

        def step(fn=fn, hidden=hidden, weight=weight, targets=targets) -> None:
            fn(hidden, weight, targets, {"cross_entropy": 1.0, "max_z": 2e-4}, CHUNK).loss.backward()

        peaks[fn.__name__], _ = cpu_peak_bytes(step)
    logits_bytes = N * V * 4
    assert peaks["naive_lm_loss"] >= 2 * logits_bytes
    assert peaks["chunked_lm_loss"] < logits_bytes / 2
    assert peaks["chunked_lm_loss"] * 4 < peaks["naive_lm_loss"]


def test_bench_runs_on_tiny_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    from haina.tools.bench.loss import main

    assert (
        main(["--vocab", "512", "--tokens", "64", "--hidden", "16", "--chunk", "16", "--device", "cpu"]) == 0
    )
    text = capsys.readouterr().out
    assert "naive" in text and "chunked" in text and "ratio chunked/naive" in text


def test_gradients_are_handed_over_without_a_copy() -> None:
    # The weight gradient is as large as the head; a copy in backward would add a weight's worth of memory.
    hidden, weight, targets = memory_inputs()
    out = chunked_lm_loss(hidden, weight, targets, ALL_TERMS, CHUNK)
    buffers = [g.data_ptr() for g in out.loss.grad_fn.grads]
    out.loss.backward()
    assert buffers == [hidden.grad.data_ptr(), weight.grad.data_ptr()]
    with pytest.raises(RuntimeError, match="backward"):
        out.loss.backward()
