"""Speed features on CPU: attention-kernel selection, flex/flash plumbing vs sdpa, compile, optimizer and
benchmark tools. GPU kernels (flash-attn, xformers) are faked where only their plumbing is under test."""

from __future__ import annotations

import itertools
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from haina.core import attention as kernels
from haina.core.config import ConfigError, load_config
from haina.core.kv_cache import KVCache
from haina.core.model import Transformer
from haina.core.registry import PluginError
from haina.plugins.model import attention_auto, attention_gpu
from haina.plugins.model.attention import FlexAttention, SDPAttention
from haina.plugins.model.attention_auto import select_kernel
from haina.plugins.model.attention_gpu import FlashAttention, cu_seqlens_from_segments
from tests.test_model import preset_model


@pytest.fixture(autouse=True)
def few_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fake_installed(monkeypatch: pytest.MonkeyPatch, installed: set[str]) -> None:
    monkeypatch.setattr(kernels, "kernel_available", lambda name: name == "sdpa" or name in installed)


# ------------------------------------------------------------------------------------------- selection

OPTIONAL = ("flash", "flex", "xformers")
DTYPES = (torch.float32, torch.bfloat16)


@pytest.mark.parametrize("installed", [set(c) for r in range(4) for c in itertools.combinations(OPTIONAL, r)])
def test_auto_selection_every_combination(monkeypatch: pytest.MonkeyPatch, installed: set[str]) -> None:
    fake_installed(monkeypatch, installed)
    for bias_kind, device, dtype in itertools.product(("none", "alibi", "dense"), ("cpu", "cuda"), DTYPES):
        got = select_kernel(bias_kind, device, dtype)
        if device == "cpu" or bias_kind == "dense":
            expected = "sdpa"  # flex on CPU has no backward and no fast path; dense biases only fit sdpa
        elif "flash" in installed and dtype == torch.bfloat16:
            expected = "flash"
        elif "flex" in installed:
            expected = "flex"
        elif "xformers" in installed:
            expected = "xformers"
        else:
            expected = "sdpa"
        assert got == expected, (installed, bias_kind, device, dtype)


def test_unsuitable_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_installed(monkeypatch, {"flash", "xformers", "flex"})
    assert kernels.unsuitable("flash", "none", "cpu", torch.bfloat16) == "runs on cuda, not cpu"
    assert "fp16/bf16" in (kernels.unsuitable("flash", "alibi", "cuda", torch.float32) or "")
    assert "dense" in (kernels.unsuitable("flex", "dense") or "")
    assert kernels.unsuitable("xformers", "alibi", "cuda", torch.float32) is None
    fake_installed(monkeypatch, set())
    assert "not installed" in (kernels.unsuitable("flash", "none") or "")


@pytest.mark.parametrize("kernel", ["flash", "xformers"])
def test_missing_kernel_by_name_is_one_config_line(monkeypatch: pytest.MonkeyPatch, kernel: str) -> None:
    fake_installed(monkeypatch, set())
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [f"model.attention={kernel}"])
    message = str(err.value)
    assert "\n" not in message and message.startswith("model.attention:") and "not installed" in message


def test_missing_kernel_by_name_exits_with_one_line(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    from haina.tools.cli import run

    fake_installed(monkeypatch, set())
    assert run(["pretrain", "--config", "tiny", "model.attention=flash"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "flash needs flash_attn" in err and "Traceback" not in err


def test_kernel_on_wrong_device_fails_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_installed(monkeypatch, {"flash"})
    model = tiny(attention="flash")
    with pytest.raises(PluginError, match=r"^attention=flash runs on cuda, not cpu$"):
        model(torch.randint(0, 512, (1, 8)))


def test_auto_logs_its_choice_once(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention_auto, "_logged", set())
    model = tiny(attention="auto")
    with caplog.at_level("INFO", logger="haina.attention"):
        model(torch.randint(0, 512, (1, 8)))
        model(torch.randint(0, 512, (1, 8)))
    chose = [r for r in caplog.records if "auto chose" in r.getMessage()]
    assert len(chose) == 1 and "sdpa" in chose[0].getMessage()


# ------------------------------------------------------------------------------------ kernels vs sdpa

def tiny(seed: int = 0, **overrides: Any) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(preset_model("tiny", **overrides))
    model.init_weights()
    return model


def packed_segments() -> torch.Tensor:
    """Two rows of 40: three documents / two documents and trailing padding."""
    seg = torch.ones(2, 40, dtype=torch.long)
    seg[0, 10:25], seg[0, 25:] = 2, 3
    seg[1, 18:33], seg[1, 33:] = 2, 0
    return seg


def restarted_positions(segments: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 in each document, as packed SFT data has them."""
    pos = torch.zeros_like(segments)
    for b in range(segments.shape[0]):
        count = 0
        for i in range(segments.shape[1]):
            count = 0 if i and segments[b, i] != segments[b, i - 1] else count
            pos[b, i] = count
            count += 1
    return pos


def run_pair(kernel: str, position: str, segments: torch.Tensor | None, positions: torch.Tensor | None = None):
    """Output and parameter gradients of the same weights under sdpa and under ``kernel``."""
    results = []
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    for name in ("sdpa", kernel):
        model = tiny(position=position, attention=name)
        out = model(tokens, positions, segments=segments)
        keep = torch.ones_like(tokens, dtype=torch.bool) if segments is None else segments != 0
        (out * keep[..., None]).square().mean().backward()
        results.append((out.detach() * keep[..., None], {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    return results


@pytest.mark.parametrize(
    ("position", "packed"), [("alibi", False), ("alibi", True), ("rope", True)], ids=["alibi", "alibi-docs", "rope-docs"]
)
def test_flex_matches_sdpa_forward_and_backward(position: str, packed: bool) -> None:
    segments = packed_segments() if packed else None
    positions = restarted_positions(segments) if packed else None
    (out_ref, grads_ref), (out, grads) = run_pair("flex", position, segments, positions)
    torch.testing.assert_close(out, out_ref, atol=2e-5, rtol=1e-4)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=2e-5, rtol=1e-4, msg=name)


def test_flex_forward_is_the_flex_kernel_and_matches_sdpa_without_grad() -> None:
    segments = packed_segments()
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 40, 16) for _ in range(3))
    model = tiny(position="alibi")
    inputs = model.attention_inputs(torch.zeros(2, 40, dtype=torch.long), restarted_positions(segments), segments, None)
    with torch.no_grad():
        torch.testing.assert_close(FlexAttention()(q, k, v, inputs), SDPAttention()(q, k, v, inputs), atol=2e-5, rtol=1e-4)


def test_flex_uses_only_this_ranks_alibi_slopes() -> None:
    """Under tensor parallelism a rank holds heads [2, 4) of 4 and their slopes only."""
    model = tiny(position="alibi")
    model.position.shard_heads(1, 2)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 24, 16) for _ in range(3))
    inputs = model.attention_inputs(torch.zeros(1, 24, dtype=torch.long), torch.arange(24), None, None)
    with torch.no_grad():
        flex = FlexAttention()(q, k, v, inputs)
    full = tiny(position="alibi").position.bias(torch.arange(24), torch.arange(24))[2:]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=full)
    torch.testing.assert_close(flex, expected, atol=2e-5, rtol=1e-4)


def test_flex_kv_cache_decoding_matches_one_forward() -> None:
    model = tiny(position="alibi", attention="flex")
    tokens = torch.randint(0, 512, (2, 12))
    segments = torch.tensor([[0, 0, 0] + [1] * 9, [1] * 12])  # left padding, as generation makes it
    positions = (segments.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(tokens, positions, segments=segments)
        cache = KVCache(2, 12)
        first = model(tokens[:, :8], positions[:, :8], segments=segments[:, :8], cache=cache)
        rest = [model(tokens[:, i : i + 1], positions[:, i : i + 1], segments=segments[:, i : i + 1], cache=cache)
                for i in range(8, 12)]
    got = torch.cat([first, *rest], 1)
    keep = (segments != 0)[..., None]
    torch.testing.assert_close(got * keep, full * keep, atol=2e-5, rtol=1e-4)


# --------------------------------------------------------------------------- flash plumbing (faked lib)

def test_cu_seqlens_split_documents_rows_and_padding() -> None:
    seg = torch.tensor([[1, 1, 2, 2, 2, 0], [0, 0, 1, 1, 1, 1]])
    cu, longest = cu_seqlens_from_segments(seg)
    assert cu.tolist() == [0, 2, 5, 6, 7, 8, 12] and cu.dtype == torch.int32 and longest == 4


def _fake_flash_module() -> types.ModuleType:
    """flash-attn's two entry points written with sdpa on CPU: [b, s, h, d] layout, bottom-right causal,
    ALiBi as -slope * |i - j|; enough to test how FlashAttention calls them."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor | None) -> torch.Tensor:
        q, k, v = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, h, s, d]
        n = q.shape[2]
        bias = torch.zeros(n, n).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        if slopes is not None:
            dist = (torch.arange(n)[None, :] - torch.arange(n)[:, None]).abs().float()
            bias = bias - slopes[:, None, None] * dist
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)[0].transpose(0, 1)

    def flash_attn_func(q, k, v, causal=False, alibi_slopes=None):  # noqa: ANN001, ANN202
        assert causal
        return torch.stack([attend(q[i], k[i], v[i], alibi_slopes) for i in range(q.shape[0])])

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=False, alibi_slopes=None):  # noqa: ANN001, ANN202
        assert causal and torch.equal(cu_q, cu_k) and max_q == max_k
        bounds = cu_q.tolist()
        return torch.cat([attend(q[a:b], k[a:b], v[a:b], alibi_slopes) for a, b in itertools.pairwise(bounds)])

    module = types.ModuleType("flash_attn")
    module.flash_attn_func = flash_attn_func  # type: ignore[attr-defined]
    module.flash_attn_varlen_func = flash_attn_varlen_func  # type: ignore[attr-defined]
    return module


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_flash_plumbing_matches_sdpa_with_packed_documents(monkeypatch: pytest.MonkeyPatch, position: str) -> None:
    fake_installed(monkeypatch, {"flash"})
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_module())
    monkeypatch.setattr(attention_gpu, "check_runtime", lambda name, q: None)  # the fake runs on CPU in fp32
    segments = packed_segments()
    for segs in (None, segments):
        positions = None if segs is None else restarted_positions(segs)
        (out_ref, grads_ref), (out, grads) = run_pair("flash", position, segs, positions)
        torch.testing.assert_close(out, out_ref, atol=2e-5, rtol=1e-4)
        for name in grads:
            torch.testing.assert_close(grads[name], grads_ref[name], atol=2e-5, rtol=1e-4, msg=name)
    assert isinstance(tiny(attention="flash").layers["0"].self_attn.kernel, FlashAttention)


# ------------------------------------------------------------------------------ compile, optim, tools

def test_optimizer_backend_on_cpu() -> None:
    from haina.core.config import OptimConfig
    from haina.core.optim import build_optimizer, optimizer_backend

    model = tiny()
    assert optimizer_backend(model) == "torch-fused"
    optim = build_optimizer(model, OptimConfig())
    assert optim.defaults["fused"] is True


def test_backend_report_names_the_choices() -> None:
    from haina.tools.backend_report import backend_report

    lines = backend_report(load_config("tiny"), torch.device("cpu"))
    text = "\n".join(lines)
    assert "attention  auto -> sdpa" in text and "norm       rmsnorm -> torch rms_norm" in text
    assert "optimizer" in text and "compile    off" in text


def test_gpu_check_dry_run_counts_flops_and_formats(capsys: Any) -> None:
    from haina.tools import gpu_check

    rows = gpu_check.main(["--dry-run", "--kernels", "flash,sdpa", "--no-compile"])
    out = capsys.readouterr().out
    assert "1.32B parameters" in out and "GFLOP per token" in out and len(rows) == 2
    assert gpu_check.mfu(6e9, 1e5, 989.0) == pytest.approx(6e14 / 989e12)
    table = gpu_check.format_table([gpu_check.Row("flex", True, 0.5, 8192.0, 0.4123, 30.25)])
    assert table.splitlines()[-1].split() == ["flex", "yes", "0.500", "8,192", "41.2", "30.2"]


def test_gpu_check_plans_its_rows_within_budget() -> None:
    """One compiled row by default (compiling is where the minutes go), none in --quick."""
    from haina.tools import gpu_check

    def plan(*flags: str) -> list[tuple[str, bool]]:
        args = gpu_check.argparse.Namespace(no_compile="--no-compile" in flags, compile_all="--compile-all" in flags)
        return gpu_check.planned_rows(["flash", "flex", "xformers", "sdpa"], ["flex", "sdpa"], args)

    assert plan() == [("flash", False), ("flex", False), ("xformers", False), ("sdpa", False), ("flex", True)]
    assert plan("--compile-all")[-2:] == [("flex", True), ("sdpa", True)]
    assert all(not c for _, c in plan("--no-compile"))
    rows = gpu_check.main(["--dry-run", "--quick"])
    assert rows and not any(r.compiled for r in rows)


def test_gpu_check_review_rows_pass_on_cpu(capsys: Any) -> None:
    from haina.tools import gpu_check

    results = gpu_check.review_checks(torch.device("cpu"))
    assert len(results) == 4 and all(ok for _, _, ok in results), results
    assert "row 10" in capsys.readouterr().out


def test_bench_speed_runs_and_reports_a_ratio(capsys: Any) -> None:
    pytest.importorskip("transformers")
    from haina.tools.bench import speed as bench_speed

    result = bench_speed.main(["--hidden", "64", "--layers", "1", "--heads", "2", "--vocab", "512", "--batch", "1",
                               "--seq", "32", "--rounds", "1", "--steps", "1", "--warmup", "0", "--chunk", "16"])
    assert result["ratio"] > 0 and "haina / transformers" in capsys.readouterr().out


def test_apex_norm_by_name_fails_in_one_line_without_apex(monkeypatch: pytest.MonkeyPatch) -> None:
    from haina.plugins.model import norm

    monkeypatch.setattr(norm, "apex_available", lambda: False)
    with pytest.raises(PluginError, match=r"^norm=apex needs NVIDIA apex") as info:
        tiny(norm="apex")
    assert "\n" not in str(info.value)
    # The default rmsnorm falls back to torch's kernel on CPU whatever is installed.
    x = torch.randn(2, 3, 64)
    layer = tiny().norm
    torch.testing.assert_close(layer(x), F.rms_norm(x, (64,), layer.weight, layer.eps))
