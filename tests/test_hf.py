"""Hugging Face export and import: transformers' Llama logits, Baichuan 2 names, exact round trips,
checkpoints of tp=2 and pp=2 runs, resuming training from an import, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from haina.core.model_loading import load_hf_model, load_model
from haina.core.train import train
from haina.tools.hf.export import export_hf
from haina.tools.hf.importer import import_hf
from tests.conftest import one_line_error, tiny_config
from tests.parallel_helpers import run_pretrain

safetensors_torch = pytest.importorskip("safetensors.torch")

LAYOUT_STEPS = ("train.steps=2", "train.micro_batch_size=1", "train.global_batch_size=4", "optim.decay_steps=2")


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    return safetensors_torch.load_file(str(model_dir / "model.safetensors"))


def _logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.logits(model(tokens))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> dict[str, Path]:
    """Single-process tiny runs (8 steps, so the weights have moved off their init): rope and alibi."""
    root = tmp_path_factory.mktemp("hf_runs")
    out = {}
    for position in ("rope", "alibi"):
        train(tiny_config(root / position, tiny_data, f"model.position={position}"))
        out[position] = root / position
    return out


def test_llama_export_matches_transformers_logits(runs: dict[str, Path], tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    out = export_hf(runs["rope"], tmp_path / "llama", "llama")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == config["num_attention_heads"] == 4
    tensors = _tensors(out)
    assert tensors["model.layers.1.self_attn.k_proj.weight"].shape == (64, 64)
    assert "model.layers.0.self_attn.W_pack.weight" not in tensors
    assert torch.allclose(tensors["lm_head.weight"].norm(dim=1), torch.ones(512), atol=1e-5)  # NormHead, normalized

    hf = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    assert next(hf.parameters()).dtype == torch.float32
    _, model = load_model(runs["rope"])
    tokens = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    ours = _logits(model, tokens)
    with torch.no_grad():
        theirs = hf(tokens).logits
    diff = (ours - theirs).abs().max().item()
    print(f"max |haina - transformers| logits = {diff:.3g}")
    assert diff < 1e-4
    # The comparison has teeth: swapping two heads' K rows (a wrong split or rotation) shows up.
    k = hf.model.layers[0].self_attn.k_proj.weight
    with torch.no_grad():
        k.copy_(torch.cat([k[16:32], k[:16], k[32:]]))
        assert (hf(tokens).logits - ours).abs().max().item() > 1e-3


def test_baichuan_export_uses_release_names(runs: dict[str, Path], tmp_path: Path) -> None:
    out = export_hf(runs["alibi"], tmp_path / "bc", "baichuan", dtype="bfloat16")
    tensors = _tensors(out)
    layer0 = {k for k in tensors if k.startswith("model.layers.0.")}
    assert layer0 == {f"model.layers.0.{n}.weight" for n in (
        "self_attn.W_pack", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
        "input_layernorm", "post_attention_layernorm")}
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(tensors)
    assert tensors["model.layers.0.self_attn.W_pack.weight"].shape == (192, 64)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BaichuanForCausalLM"] and config["model_max_length"] == 128
    assert config["haina"]["position"] == "alibi"
    # NormHead: the release normalizes at run time, so the raw (not unit-norm) matrix is stored.
    _, model = load_model(runs["alibi"])
    assert torch.equal(tensors["lm_head.weight"], model.head.weight.detach().to(torch.bfloat16))


@pytest.mark.parametrize(("position", "fmt"), [("rope", "llama"), ("rope", "baichuan"), ("alibi", "baichuan")])
def test_round_trip_is_exact(runs: dict[str, Path], tmp_path: Path, position: str, fmt: str) -> None:
    first = export_hf(runs[position], tmp_path / "first", fmt)
    step_dir = import_hf(first, tmp_path / "imported")
    assert step_dir == tmp_path / "imported" / "checkpoints" / "step_0"
    assert (tmp_path / "imported" / "checkpoints" / "latest").read_text().strip() == "step_0"
    second = export_hf(tmp_path / "imported", tmp_path / "second", fmt)
    a, b = _tensors(first), _tensors(second)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The imported model computes what the original does.
    _, original = load_model(runs[position])
    cfg, imported = load_hf_model(first)
    assert cfg.model.position == position and cfg.model.head == "normhead"
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(_logits(original, tokens), _logits(imported, tokens), atol=1e-5)


def test_training_resumes_from_an_import(runs: dict[str, Path], tmp_path: Path, tiny_data: Path) -> None:
    export_hf(runs["rope"], tmp_path / "bc", "baichuan")
    import_hf(tmp_path / "bc", tmp_path / "run", base="tiny")
    _, original = load_model(runs["rope"])
    _, imported = load_model(tmp_path / "run")
    assert all(torch.equal(original.state_dict()[k], v) for k, v in imported.state_dict().items())
    common = ("train.steps=1", "train.resume=true")
    resumed = train(tiny_config(tmp_path / "run", tiny_data, *common))
    fresh = train(tiny_config(tmp_path / "fresh", tiny_data, *common))
    assert [r["step"] for r in resumed.records] == [1]
    assert resumed.final_loss < fresh.final_loss - 0.5  # started from the trained weights, not from init


@pytest.mark.integration
@pytest.mark.parametrize("layout", ["tp=2", "pp=2"])
def test_export_from_parallel_checkpoints(layout: str, tmp_path: Path, tiny_data: Path) -> None:
    """A tp=2 / pp=2 checkpoint exports to the weights a one-process run of the same steps exports, loads
    in transformers with matching logits, and round-trips exactly."""
    transformers = pytest.importorskip("transformers")
    run_pretrain(tmp_path / "par", tiny_data, 2, *LAYOUT_STEPS, f"parallel.{layout}")
    train(tiny_config(tmp_path / "one", tiny_data, *LAYOUT_STEPS))
    par = export_hf(tmp_path / "par", tmp_path / "par_llama", "llama")
    one = export_hf(tmp_path / "one", tmp_path / "one_llama", "llama")
    a, b = _tensors(par), _tensors(one)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4

    hf = transformers.LlamaForCausalLM.from_pretrained(str(par)).eval()
    _, model = load_model(tmp_path / "par")
    tokens = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf(tokens).logits - _logits(model, tokens)).abs().max().item() < 1e-4

    bc = export_hf(tmp_path / "par", tmp_path / "par_bc", "baichuan")
    import_hf(bc, tmp_path / "back")
    again = export_hf(tmp_path / "back", tmp_path / "again", "baichuan")
    x, y = _tensors(bc), _tensors(again)
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_errors_are_one_line(runs: dict[str, Path], tmp_path: Path) -> None:
    assert "needs a RoPE model" in one_line_error(export_hf, runs["alibi"], tmp_path / "x", "llama")
    assert "no checkpoint" in one_line_error(export_hf, tmp_path / "nowhere", tmp_path / "x")
    assert "--format 'gguf'" in one_line_error(export_hf, runs["rope"], tmp_path / "x", "gguf")
    assert "no config.json" in one_line_error(import_hf, tmp_path, tmp_path / "y")
    # A foreign architecture is refused rather than half-converted.
    model_dir = export_hf(runs["rope"], tmp_path / "gqa", "llama")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 2}))
    assert "grouped-query" in one_line_error(import_hf, model_dir, tmp_path / "z")
    (model_dir / "config.json").write_text(json.dumps(config))
    tensors = _tensors(model_dir)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    safetensors_torch.save_file(tensors, str(model_dir / "model.safetensors"))
    assert "no weight for layers.1.mlp.up_proj.weight" in one_line_error(import_hf, model_dir, tmp_path / "w")
