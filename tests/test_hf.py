"""Hugging Face export and import: transformers' Llama logits, Baichuan 2 names, the Baichuan export's own
model code in transformers (logits, greedy generation, tokenizer), exact round trips, the position encoding an
import reads, checkpoints of tp=2 and pp=2 runs, resuming training from an import, one-line errors."""

from __future__ import annotations

import ast
import inspect
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from haina.core import hf_layout
from haina.core.config import TokenizerConfig, load_config
from haina.core.generate import Sampling, generate
from haina.core.model import build_model
from haina.core.model_loading import load_hf_model, load_model
from haina.core.tokenizer import Tokenizer
from haina.core.train import train
from haina.plugins.model.position import alibi_slopes
from haina.tools.hf import remote_code
from haina.tools.hf.export import export_hf, save_hf
from haina.tools.hf.importer import import_hf
from haina.tools.tokenizer import train_tokenizer
from tests.conftest import EOS, one_line_error, tiny_config
from tests.parallel_helpers import run_pretrains

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


# ------------------------------------------------------------------- the Baichuan export's own model code

# What a user's environment must have for the shipped files: nothing of haina.
REMOTE_IMPORTS = {"torch", "transformers", "sentencepiece", *sys.stdlib_module_names}


def _absolute_imports(path: Path) -> set[str]:
    """Top-level packages a file imports (relative imports stay inside the model directory)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def _load_remote(model_dir: Path) -> Any:
    """AutoModelForCausalLM of ``model_dir`` with trust_remote_code, after checking that the classes it runs
    are the directory's own files (copied into transformers' module cache), which import no haina."""
    transformers = pytest.importorskip("transformers")
    for name in remote_code.FILES:
        assert _absolute_imports(model_dir / name) <= REMOTE_IMPORTS, name
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=True).eval()
    for cls, name in ((type(hf), "modeling_baichuan.py"), (type(hf.config), "configuration_baichuan.py")):
        assert cls.__module__.startswith("transformers_modules."), cls.__module__
        source = Path(inspect.getfile(cls))
        assert source.parent != Path(remote_code.__file__).parent  # not haina's copy of the file
        assert source.read_bytes() == (model_dir / name).read_bytes()
    assert next(hf.parameters()).dtype == torch.float32
    return hf


def _module_of(hf: Any) -> ModuleType:
    return sys.modules[type(hf).__module__]


def _hf_logits(hf: Any, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(tokens).logits


def _until_eos(ids: list[int]) -> list[int]:
    return ids[: ids.index(EOS) + 1] if EOS in ids else ids


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_baichuan_export_runs_in_transformers(runs: dict[str, Path], tmp_path: Path, position: str) -> None:
    """The export loads with trust_remote_code and no haina code, gives haina's logits, and decodes haina's
    greedy tokens through transformers' generate (its DynamicCache, a left-padded batch included)."""
    pytest.importorskip("transformers")
    from transformers import DynamicCache

    out = export_hf(runs[position], tmp_path / f"bc_{position}", "baichuan")
    hf = _load_remote(out)
    assert hf.config.position_embedding == position
    _, model = load_model(runs[position])
    tokens = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    ours = _logits(model, tokens)
    theirs = _hf_logits(hf, tokens)
    diff = (ours - theirs).abs().max().item()
    print(f"{position}: max |haina - Baichuan remote code| logits = {diff:.3g} (logits up to {ours.abs().max():.3g})")
    assert diff < 1e-5

    # The KV cache: a transformers DynamicCache, and decoding on it gives the full forward's logits.
    with torch.no_grad():
        first = hf(tokens[:, :40], use_cache=True)
        assert isinstance(first.cache, DynamicCache) and first.cache.get_seq_length() == 40
        step = hf(tokens[:, 40:], cache=first.cache).logits
    assert (step - theirs[:, 40:]).abs().max().item() < 1e-5

    prompts = [tokens[0, :12].tolist(), tokens[1, :7].tolist()]
    expected = generate(model, prompts, Sampling(max_new_tokens=8, temperature=0), eos_id=EOS, pad_id=0)
    options = {"do_sample": False, "max_new_tokens": 8, "eos_token_id": EOS, "pad_token_id": 0}
    for prompt, ids in zip(prompts, expected, strict=True):
        single = hf.generate(torch.tensor([prompt]), **options)
        assert single[0, len(prompt):].tolist() == ids
    width = max(map(len, prompts))
    batch = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    padded = hf.generate(batch, attention_mask=mask, **options)
    assert [_until_eos(row[width:].tolist()) for row in padded] == expected

    # The comparison has teeth: swapping two heads' query rows in W_pack (a wrong head split) shows up.
    w_pack = hf.model.layers[0].self_attn.W_pack.weight
    with torch.no_grad():
        w_pack.copy_(torch.cat([w_pack[16:32], w_pack[:16], w_pack[32:]]))
    assert (_hf_logits(hf, tokens) - ours).abs().max().item() > 1e-3


def test_baichuan_alibi_slopes_of_40_heads(tmp_path: Path) -> None:
    """A head count that is not a power of two (Baichuan 2 13B's 40) gets haina's slopes exactly."""
    cfg = load_config("tiny", ["model.position=alibi", "model.num_heads=40", "model.hidden_size=160",
                               "model.num_layers=1", f"train.run_dir={json.dumps(str(tmp_path / 'run'))}"])
    model = build_model(cfg, torch.device("cpu")).eval()
    hf = _load_remote(save_hf(model, cfg, tmp_path / "bc_alibi40", "baichuan"))
    module = _module_of(hf)
    for heads in (1, 2, 3, 5, 6, 12, 20, 40, 48, 64, 80):
        assert torch.equal(module.alibi_slopes(heads), alibi_slopes(heads)), heads
    tokens = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(3))
    ours = _logits(model, tokens)
    diff = (ours - _hf_logits(hf, tokens)).abs().max().item()
    print(f"alibi, 40 heads: max |haina - Baichuan remote code| logits = {diff:.3g}")
    assert diff < 1e-5
    # Teeth: the plain geometric series over all 40 heads (the power-of-two formula) is caught.
    naive = torch.tensor([2.0 ** (-8.0 * (i + 1) / 40) for i in range(40)])
    assert not torch.allclose(naive, alibi_slopes(40))
    original = module.alibi_slopes
    try:
        module.alibi_slopes = lambda n: naive
        assert (_hf_logits(hf, tokens) - ours).abs().max().item() > 1e-5
    finally:
        module.alibi_slopes = original


def _tokenizer_text() -> str:
    from pydoc_data.topics import topics

    english = "\n".join(topics[name] for name in sorted(topics)[:6])
    code = "def f(x):\n\tif x:\n\t\treturn  x    # four spaces\n        y = {'k': [1, 2]}\n"
    return english + "\n" + code * 20 + "深度学习模型需要大量的训练数据。\n我们使用中文和英文的语料。\n" * 20


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sp")
    (folder / "train.txt").write_text(_tokenizer_text(), encoding="utf-8")
    return train_tokenizer([folder / "train.txt"], folder / "small", TokenizerConfig(vocab_size=512, seed=7))


def test_baichuan_tokenizer_encodes_like_haina(runs: dict[str, Path], sp_model: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    out = export_hf(runs["rope"], tmp_path / "bc_tok", "baichuan", tokenizer=str(sp_model))
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    assert type(hf_tok).__module__.startswith("transformers_modules.")
    assert Path(inspect.getfile(type(hf_tok))).read_bytes() == (out / "tokenization_baichuan.py").read_bytes()
    ours = Tokenizer(sp_model)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.unk_token_id) == (ours.bos_id, ours.eos_id, ours.unk_id)
    assert len(hf_tok) == ours.vocab_size
    texts = [
        "The quick brown fox jumps over the lazy dog.",
        "  two leading spaces,\ttabs\t\tand\nnew lines   ",
        "深度学习模型需要大量的训练数据 2024",
        "def walk(tree):\n    for node in tree:\n        yield node",
        "a literal \u2581 piece marker, and \u2581\u2581 twice",
        "<reserved_106>hello<reserved_107>",
        "unseen characters: ☃ 𝄞 Ж",
    ]
    for text in texts:
        ids = hf_tok(text)["input_ids"]
        assert ids == ours.encode(text), text
        assert hf_tok.decode(ids) == ours.decode(ids) == text
    assert hf_tok.convert_tokens_to_ids(hf_tok.tokenize(texts[0])) == ours.encode(texts[0])
    assert hf_tok(["hi", "ho"])["input_ids"] == [ours.encode("hi"), ours.encode("ho")]  # no bos/eos added


# ------------------------------------------------------------------- which position encoding an import reads

# The Baichuan 2 release's config.json fields (7B-Base and 13B-Base): neither names its position encoding.
RELEASE_7B = {
    "architectures": ["BaichuanForCausalLM"], "model_type": "baichuan", "vocab_size": 125696,
    "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
    "hidden_act": "silu", "max_position_embeddings": 4096, "model_max_length": 4096, "rms_norm_eps": 1e-6,
    "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    "tie_word_embeddings": False, "use_cache": True, "z_loss_weight": 0, "tokenizer_class": "BaichuanTokenizer",
}
RELEASE_13B = {
    **{k: v for k, v in RELEASE_7B.items() if k != "max_position_embeddings"},
    "hidden_size": 5120, "intermediate_size": 13696, "num_hidden_layers": 40, "num_attention_heads": 40,
    "gradient_checkpointing": False,
}


def test_import_reads_the_position_encoding_from_the_config(runs: dict[str, Path], tmp_path: Path) -> None:
    out = export_hf(runs["alibi"], tmp_path / "bc", "baichuan")
    config = json.loads((out / "config.json").read_text())
    assert config["position_embedding"] == "alibi"
    assert not {"max_position_embeddings", "rope_theta"} & set(config)  # as the 13B release: no RoPE field
    del config["haina"]
    (out / "config.json").write_text(json.dumps(config))
    cfg, imported = load_hf_model(out)
    assert cfg.model.position == "alibi"
    _, original = load_model(runs["alibi"])
    tokens = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(4))
    assert torch.allclose(_logits(original, tokens), _logits(imported, tokens), atol=1e-5)

    (out / "config.json").write_text(json.dumps({**config, "haina": {"position": "rope"}}))
    assert "contradicts" in one_line_error(import_hf, out, tmp_path / "a")
    del config["position_embedding"]
    (out / "config.json").write_text(json.dumps(config))
    message = one_line_error(import_hf, out, tmp_path / "b")
    assert "no position encoding" in message and "\n" not in message
    assert not (tmp_path / "b").exists()

    # The release configs, told apart by their own fields: a RoPE field, or the 13B config and nothing more.
    assert hf_layout.model_fields(RELEASE_7B, "baichuan")["position"] == "rope"
    assert hf_layout.model_fields(RELEASE_13B, "baichuan")["position"] == "alibi"
    assert hf_layout.model_fields({**RELEASE_13B, "rope_theta": 1e4}, "baichuan")["position"] == "rope"
    assert hf_layout.model_fields({**RELEASE_13B, "position_embedding": "rope"}, "baichuan")["position"] == "rope"
    not_13b = {**RELEASE_13B, "num_hidden_layers": 41}  # the shape alone never decides
    assert "no position encoding" in one_line_error(hf_layout.model_fields, not_13b, "baichuan")
    assert "'xpos'" in one_line_error(hf_layout.model_fields, {**RELEASE_7B, "position_embedding": "xpos"}, "baichuan")


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


@pytest.fixture(scope="module")
def parallel_runs(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> dict[str, Path]:
    """The same steps in one process and under tp=2 and pp=2 (both in one two-process launch)."""
    root = tmp_path_factory.mktemp("parallel")
    train(tiny_config(root / "one", tiny_data, *LAYOUT_STEPS))
    run_pretrains([(layout, root / layout, [*LAYOUT_STEPS, f"parallel.{layout}"]) for layout in ("tp=2", "pp=2")],
                  tiny_data, 2)
    return {name: root / name for name in ("one", "tp=2", "pp=2")}


@pytest.mark.integration
@pytest.mark.parametrize("layout", ["tp=2", "pp=2"])
def test_export_from_parallel_checkpoints(layout: str, tmp_path: Path, parallel_runs: dict[str, Path]) -> None:
    """A tp=2 / pp=2 checkpoint exports to the weights a one-process run of the same steps exports, loads
    in transformers with matching logits, and round-trips exactly."""
    transformers = pytest.importorskip("transformers")
    saved = load_config(str(parallel_runs[layout] / "config.yaml")).parallel
    assert (saved.tp, saved.pp) == ((2, 1) if layout == "tp=2" else (1, 2))  # it ran as that layout
    par = export_hf(parallel_runs[layout], tmp_path / "par_llama", "llama")
    one = export_hf(parallel_runs["one"], tmp_path / "one_llama", "llama")
    a, b = _tensors(par), _tensors(one)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4

    hf = transformers.LlamaForCausalLM.from_pretrained(str(par)).eval()
    _, model = load_model(parallel_runs[layout])
    tokens = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf(tokens).logits - _logits(model, tokens)).abs().max().item() < 1e-4

    bc = export_hf(parallel_runs[layout], tmp_path / "par_bc", "baichuan")
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
