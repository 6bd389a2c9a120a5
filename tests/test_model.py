"""The Baichuan 2 model and its component plugins: shapes, parameter counts, numerics and a smoke training run."""

from __future__ import annotations

import math
from collections.abc import Iterator
from importlib import resources
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml

from haina.core.config import ModelConfig
from haina.core.model import Transformer, count_parameters
from haina.plugins.model.attention import SDPAttention
from haina.plugins.model.head import LinearHead, NormHead
from haina.plugins.model.mlp import SwiGLU
from haina.plugins.model.position import RotaryEmbedding, alibi_bias, alibi_slopes


def preset_model(name: str, **overrides: Any) -> ModelConfig:
    """The ``model`` section of a preset (only that section, so these tests need no loss/algorithm plugin)."""
    text = (resources.files("haina.core") / "presets" / f"{name}.yaml").read_text(encoding="utf-8")
    return ModelConfig(**{**yaml.safe_load(text)["model"], **overrides})


def tiny_model(seed: int = 0, **overrides: Any) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(preset_model("tiny", **overrides))
    model.init_weights()
    return model


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny matrices run fastest (and steadiest on a shared CI box) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------ head

def test_normhead_is_a_linear_layer_over_row_normalized_weight() -> None:
    cfg = ModelConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, head="normhead")
    torch.manual_seed(0)
    head = NormHead(cfg)
    h = torch.randn(3, 5, 16)
    rows = head.weight.detach() / head.weight.detach().norm(dim=1, keepdim=True)
    torch.testing.assert_close(head(h), h @ rows.T)
    torch.testing.assert_close(head.effective_weight().norm(dim=1), torch.ones(50))
    # The linear head is the raw weight; the two heads differ on the same weight.
    linear = LinearHead(cfg)
    linear.weight.data.copy_(head.weight.data)
    torch.testing.assert_close(linear(h), h @ head.weight.detach().T)
    assert not torch.allclose(linear(h), head(h))


def test_normhead_rows_stay_unit_norm_under_training() -> None:
    cfg = ModelConfig(vocab_size=40, hidden_size=8, num_layers=1, num_heads=2, head="normhead")
    torch.manual_seed(0)
    head = NormHead(cfg)
    opt = torch.optim.AdamW(head.parameters(), lr=0.05, weight_decay=0.1)
    for _ in range(5):
        h = torch.randn(16, 8)
        loss = (head(h) ** 3).mean() + head(h).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    raw = head.weight.detach().norm(dim=1)
    assert (raw - 1).abs().max() > 0.01  # the optimizer moved the raw rows off any fixed norm ...
    torch.testing.assert_close(head.effective_weight().norm(dim=1), torch.ones(40))  # ... not the effective ones


# ----------------------------------------------------------------------------------------------- ALiBi

EXPECTED_SLOPES = {
    8: [2.0 ** -(i + 1) for i in range(8)],
    32: [2.0 ** (-(i + 1) / 4) for i in range(32)],
    # 12 heads: the 8-head series, then 2^(-(2j+1)/2), j = 0..3 (every second slope of the 16-head series).
    12: [2.0 ** -(i + 1) for i in range(8)] + [2.0 ** (-(2 * j + 1) / 2) for j in range(4)],
    # 40 heads (RECIPE.md): 2^(-k/4), k = 1..32, then 2^(-(2j+1)/8), j = 0..7.
    40: [2.0 ** (-k / 4) for k in range(1, 33)] + [2.0 ** (-(2 * j + 1) / 8) for j in range(8)],
}


@pytest.mark.parametrize("n_heads", sorted(EXPECTED_SLOPES))
def test_alibi_slopes_match_reference_formula(n_heads: int) -> None:
    slopes = alibi_slopes(n_heads)
    assert slopes.dtype == torch.float32 and slopes.shape == (n_heads,)
    torch.testing.assert_close(slopes, torch.tensor(EXPECTED_SLOPES[n_heads]), rtol=0, atol=1e-7)


def test_alibi_bias_is_slope_times_distance_with_causal_mask() -> None:
    slopes = torch.tensor([0.5, 0.25])
    pos = torch.arange(4)
    bias = alibi_bias(slopes, pos, pos)
    assert bias.shape == (2, 4, 4) and bias.dtype == torch.float32
    for h in range(2):
        for i in range(4):
            for j in range(4):
                expected = slopes[h].item() * (j - i) if j <= i else -math.inf
                assert bias[h, i, j].item() == expected
    # Batched positions give a batch dimension; under autocast the bias stays fp32.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        batched = alibi_bias(slopes, torch.stack([pos, pos + 3]), torch.stack([pos, pos + 3]))
    assert batched.shape == (2, 2, 4, 4) and batched.dtype == torch.float32
    torch.testing.assert_close(batched[1], bias)  # only relative distances matter


def test_alibi_bias_reaches_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model(position="alibi")
    seen: list[torch.Tensor | None] = []
    for layer in model.layers.values():
        kernel = layer.self_attn.kernel
        original = kernel.forward

        def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: Any, _orig=original):
            seen.append(attn.dense_bias())  # kernels get the mask info; sdpa turns it into this bias
            return _orig(q, k, v, attn)

        monkeypatch.setattr(kernel, "forward", spy)
    model(torch.randint(0, 512, (2, 12)))
    assert len(seen) == len(model.layers)
    for bias in seen:
        assert bias is not None
        torch.testing.assert_close(bias, alibi_bias(alibi_slopes(4), torch.arange(12), torch.arange(12)))


def test_alibi_bias_changes_attention_output(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model(position="alibi")
    tokens = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        with_alibi = model(tokens)
        # Same weights, bias replaced by the plain causal mask (as an explicit additive mask) ...
        causal = torch.zeros(16, 16).masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), -math.inf)
        monkeypatch.setattr(model.position, "bias", lambda q_pos, k_pos: causal.expand(4, 16, 16))
        plain_mask = model(tokens)
        # ... and by no bias at all (the kernel's own causal path): these two must agree.
        monkeypatch.setattr(model.position, "bias", lambda q_pos, k_pos: None)
        plain_none = model(tokens)
    torch.testing.assert_close(plain_mask, plain_none)
    assert (with_alibi - plain_none)[:, 1:].abs().max() > 1e-3  # position 0 sees only itself either way


# ------------------------------------------------------------------------------------------------ RoPE

def _rope_reference(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """fp64 rotate_half RoPE, written out independently."""
    d = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions.double()[:, None] * inv_freq[None, :]
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)
    x = x.double()
    rotated = torch.cat((-x[..., d // 2 :], x[..., : d // 2]), dim=-1)
    return x * cos + rotated * sin


def test_rope_math_is_fp32_under_bf16_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = ModelConfig(vocab_size=10, hidden_size=512, num_layers=1, num_heads=4)  # head_dim 128 as in 7B
    rope = RotaryEmbedding(cfg)
    positions = torch.tensor([1000, 1001, 4095])
    torch.manual_seed(0)
    x = torch.randn(1, 2, 3, 128).to(torch.bfloat16)

    applied_dtypes: list[torch.dtype] = []
    original_rotate = RotaryEmbedding._rotate

    def spy(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        applied_dtypes.extend([t.dtype, cos.dtype, sin.dtype])
        return original_rotate(t, cos, sin)

    monkeypatch.setattr(RotaryEmbedding, "_rotate", staticmethod(spy))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos, sin = rope.cos_sin(positions)
        rotated = rope.rotate(x, positions)
        q_out, k_out = rope(x, x, positions)
    assert cos.dtype == sin.dtype == rotated.dtype == torch.float32
    assert set(applied_dtypes) == {torch.float32}  # forward rotated in fp32 too ...
    assert q_out.dtype == k_out.dtype == torch.bfloat16  # ... and cast back only at the end
    torch.testing.assert_close(q_out, rotated.to(torch.bfloat16), rtol=0, atol=0)

    reference = _rope_reference(x.float(), positions, cfg.rope_base)
    torch.testing.assert_close(rotated.double(), reference, rtol=0, atol=2e-3)
    # Neighbouring positions stay apart: in bf16, 1001 rounds to 1000 (the spacing there is 4) ...
    assert torch.tensor(1001.0).bfloat16().item() == 1000.0
    # ... while the fp32 cos rows of 1000 and 1001 differ clearly and match fp64.
    assert (cos[0] - cos[1]).abs().max() > 0.5
    angles64 = positions.double()[:, None] * cfg.rope_base ** (-torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    torch.testing.assert_close(cos.double(), angles64.cos().repeat(1, 2), rtol=0, atol=2e-3)


def test_rope_scores_depend_only_on_relative_position() -> None:
    cfg = ModelConfig(vocab_size=10, hidden_size=64, num_layers=1, num_heads=2)
    rope = RotaryEmbedding(cfg)
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)

    def score(m: int, n: int) -> float:
        qm, _ = rope(q, q, torch.tensor([m]))
        kn, _ = rope(k, k, torch.tensor([n]))
        return (qm * kn).sum().item()

    assert score(7, 3) == pytest.approx(score(107, 103), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 5), abs=1e-3)
    assert rope.bias(torch.arange(4), torch.arange(4)) is None


# ------------------------------------------------------------------------------------ kernel, MLP, sizes

def test_sdpa_aligns_short_queries_to_the_end_of_the_keys() -> None:
    cfg = ModelConfig(vocab_size=10, hidden_size=32, num_layers=1, num_heads=2)
    kernel = SDPAttention(cfg)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 16) for _ in range(3))
    full = kernel(q, k, v, None)
    tail = kernel(q[:, :, -3:], k, v, None)  # the last 3 queries against all 9 keys (a KV cache)
    torch.testing.assert_close(tail, full[:, :, -3:])


@pytest.mark.parametrize(("hidden", "ffn"), [(4096, 11008), (5120, 13696)])
def test_swiglu_width(hidden: int, ffn: int) -> None:
    cfg = ModelConfig(vocab_size=10, hidden_size=hidden, num_layers=1, num_heads=hidden // 128)
    with torch.device("meta"):
        mlp = SwiGLU(cfg)
    assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (ffn, hidden)
    assert mlp.down_proj.weight.shape == (hidden, ffn)
    assert all(m.bias is None for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))


def test_swiglu_computes_gated_product() -> None:
    cfg = ModelConfig(vocab_size=10, hidden_size=8, num_layers=1, num_heads=2, ffn_hidden_size=12)
    torch.manual_seed(0)
    mlp = SwiGLU(cfg)
    x = torch.randn(3, 8)
    g, u, d = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    expected = ((x @ g.T) * torch.sigmoid(x @ g.T) * (x @ u.T)) @ d.T
    torch.testing.assert_close(mlp(x), expected)


@pytest.mark.parametrize(
    ("preset", "expected"), [("baichuan2-7b", 7_505_973_248), ("baichuan2-13b", 13_896_668_160)]
)
def test_preset_parameter_counts_on_meta(preset: str, expected: int) -> None:
    with torch.device("meta"):
        model = Transformer(preset_model(preset))
    assert count_parameters(model) == expected
    # Derived position state (RoPE angles, ALiBi slopes) is not checkpointed: the state dict is parameters only.
    assert set(model.state_dict()) == {name for name, _ in model.named_parameters()}
    assert "layers.0.self_attn.W_pack.weight" in model.state_dict()


def test_meta_model_materializes_with_init_weights() -> None:
    cfg = preset_model("tiny", position="alibi")
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(3)
    model.init_weights()
    torch.testing.assert_close(model.position.slopes, alibi_slopes(cfg.num_heads))
    assert torch.isfinite(model(torch.randint(0, cfg.vocab_size, (1, 8)))).all()
    # init_weights is a pure function of the RNG state, wherever the model was built.
    reference = Transformer(cfg)
    torch.manual_seed(3)
    reference.init_weights()
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_init_weights_scales_residual_outputs() -> None:
    cfg = ModelConfig(vocab_size=256, hidden_size=256, num_layers=8, num_heads=4, init_std=0.02)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    layer = model.layers["0"]
    scaled = 0.02 / math.sqrt(2 * 8)
    assert layer.self_attn.W_pack.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert layer.mlp.gate_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert layer.self_attn.o_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert torch.equal(layer.input_layernorm.weight, torch.ones(256))
    assert torch.equal(model.norm.weight, torch.ones(256))


# ---------------------------------------------------------------------------------------- whole model

@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_later_tokens_do_not_change_earlier_hidden_states(position: str) -> None:
    model = tiny_model(position=position)
    tokens = torch.randint(0, 512, (2, 20))
    changed = tokens.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 512
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert a.shape == (2, 20, 64)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert (a[:, 12:] - b[:, 12:]).abs().amax(dim=-1).min() > 1e-4  # every later position notices


def test_bf16_autocast_forward_is_finite_and_close_to_fp32() -> None:
    model = tiny_model(position="rope")
    tokens = torch.randint(0, 512, (1, 32))
    with torch.no_grad():
        full = model(tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(tokens)
    assert torch.isfinite(low).all()
    assert F.cosine_similarity(low.float().flatten(), full.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_tiny_model_overfits_one_batch(position: str, one_thread: None) -> None:
    model = tiny_model(seed=0, position=position)
    torch.manual_seed(1)
    batch = torch.randint(0, 512, (2, 65))
    inputs, targets = batch[:, :-1], batch[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = None
    for _ in range(100):
        logits = model.logits(model(inputs))
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 5.0  # started near log(512) = 6.2
    assert loss.item() < 0.1


def test_model_moves_between_dtypes_and_from_meta() -> None:
    """nn.Module machinery (.to, to_empty) works for every position plugin: no plugin shadows it."""
    from haina.core.config import load_config

    for position in ("rope", "alibi"):
        cfg = load_config("tiny", [f"model.position={position}"]).model
        assert next(Transformer(cfg).to(torch.float64).parameters()).dtype == torch.float64
        with torch.device("meta"):
            model = Transformer(cfg)
        model.to_empty(device="cpu")
        model.init_weights()
        assert torch.isfinite(model(torch.zeros(1, 4, dtype=torch.long))).all()
