"""What the Hugging Face layouts look like: weight names, config fields, safetensors files, tokenizer files.

Shared by the export (:mod:`haina.tools.hf.export`) and the loading of HF directories
(:mod:`haina.core.model_loading`) so the two directions cannot drift apart. Two layouts:

- ``llama``: what ``transformers``' Llama classes load. Q, K and V are separate matrices; haina's RoPE
  already rotates halves of each head (the ``rotate_half`` convention those classes use), so no row
  permutation is needed; the output head is a plain matrix, so a NormHead is stored normalized.
- ``baichuan``: the Baichuan 2 release (``W_pack`` = [Q; K; V], its own NormHead that normalizes
  ``lm_head.weight`` at run time, so the raw matrix is stored), for RoPE (7B) and ALiBi (13B) models.

A ``haina`` entry in config.json records what the HF config cannot say (position, head, rope base), so an
import restores the model exactly; loaders ignore unknown config keys. A baichuan config.json also states its
position encoding in ``position_embedding``, the field of the configuration class the export ships
(:mod:`haina.tools.hf.remote_code`); an import reads it rather than guessing from the shape.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from haina.core.config import ModelConfig
from haina.core.errors import InputFileError

FORMATS = ("llama", "baichuan")
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.model"
# haina parameter name (after "layers.N.") -> HF name (after "model.layers.N."), shared by both layouts.
_LAYER_NAMES = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class HFFormatError(InputFileError):
    """Input that cannot be converted (wrong model kind, missing weight, foreign config); CLI exit 2."""


def check_format(name: str) -> str:
    if name not in FORMATS:
        raise HFFormatError(f"--format {name!r}: expected one of {', '.join(FORMATS)}")
    return name


def normalize_rows(weight: torch.Tensor) -> torch.Tensor:
    """NormHead's effective matrix; rows already at unit norm are kept bit for bit so that
    export -> import -> export reproduces the same tensor rather than a re-rounded one."""
    norms = weight.float().norm(dim=1)
    if torch.all((norms - 1).abs() < 1e-5):
        return weight
    return torch.nn.functional.normalize(weight.float(), dim=1).to(weight.dtype)


# ------------------------------------------------------------------------------------------- weights

def to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, fmt: str) -> dict[str, torch.Tensor]:
    """haina state dict (full, unsharded) -> HF tensors of ``fmt``."""
    out: dict[str, torch.Tensor] = {}
    h = cfg.hidden_size
    for name, tensor in state.items():
        match = _LAYER.match(name)
        if name == "embed_tokens.weight":
            out["model.embed_tokens.weight"] = tensor
        elif name == "norm.weight":
            out["model.norm.weight"] = tensor
        elif name == "head.weight":
            normhead = cfg.head == "normhead"
            out["lm_head.weight"] = normalize_rows(tensor) if normhead and fmt == "llama" else tensor
        elif match and match.group(2) == "self_attn.W_pack.weight":
            prefix = f"model.layers.{match.group(1)}.self_attn."
            if fmt == "baichuan":
                out[prefix + "W_pack.weight"] = tensor
            else:
                for part, rows in zip(("q_proj", "k_proj", "v_proj"), tensor.split(h), strict=True):
                    out[prefix + part + ".weight"] = rows
        elif match and match.group(2) in _LAYER_NAMES:
            out[f"model.layers.{match.group(1)}.{match.group(2)}"] = tensor
        else:
            raise HFFormatError(f"no Hugging Face name for parameter {name!r} (a plugin without an HF mapping)")
    return {k: v.contiguous() for k, v in out.items()}


def from_hf(tensors: Mapping[str, torch.Tensor], fmt: str) -> dict[str, Callable[[], torch.Tensor]]:
    """HF tensors of ``fmt`` -> {haina parameter name: a function reading its full tensor}.

    Nothing is read here: ``tensors`` may be :func:`read_weights`' lazy mapping, and each haina tensor is
    read (Q, K and V joined into W_pack for llama) only when its function is called, so a loader holds one
    tensor at a time."""
    out: dict[str, Callable[[], torch.Tensor]] = {}
    qkv: dict[str, dict[str, str]] = {}
    for name in tensors:
        match = _HF_LAYER.match(name)
        if name == "model.embed_tokens.weight":
            out["embed_tokens.weight"] = _reader(tensors, name)
        elif name == "model.norm.weight":
            out["norm.weight"] = _reader(tensors, name)
        elif name == "lm_head.weight":
            out["head.weight"] = _reader(tensors, name)
        elif match and match.group(2) in _LAYER_NAMES:
            out[f"layers.{match.group(1)}.{match.group(2)}"] = _reader(tensors, name)
        elif match and fmt == "baichuan" and match.group(2) == "self_attn.W_pack.weight":
            out[f"layers.{match.group(1)}.self_attn.W_pack.weight"] = _reader(tensors, name)
        elif match and fmt == "llama" and match.group(2) in ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                              "self_attn.v_proj.weight"):
            qkv.setdefault(match.group(1), {})[match.group(2).split(".")[1][0]] = name
        elif name.endswith("rotary_emb.inv_freq"):
            continue  # a derived buffer some exporters save; haina recomputes it
        else:
            raise HFFormatError(f"{fmt} weights: unexpected tensor {name!r}")
    for layer, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise HFFormatError(f"layer {layer}: q_proj, k_proj and v_proj are all needed, got {sorted(parts)}")
        names = [parts["q"], parts["k"], parts["v"]]
        out[f"layers.{layer}.self_attn.W_pack.weight"] = lambda names=names: torch.cat([tensors[n] for n in names])
    if "head.weight" not in out and "embed_tokens.weight" in out:
        out["head.weight"] = out["embed_tokens.weight"]  # tied embeddings: haina's head is an untied copy
    return out


def _reader(tensors: Mapping[str, torch.Tensor], name: str) -> Callable[[], torch.Tensor]:
    return lambda: tensors[name]


# ------------------------------------------------------------------------------------------- configs

def hf_config(cfg: ModelConfig, fmt: str, dtype: torch.dtype, special: dict[str, int]) -> dict[str, Any]:
    """config.json of ``fmt`` for a model of ``cfg``; ``special`` holds bos/eos/pad ids when known."""
    common: dict[str, Any] = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "bos_token_id": special.get("bos", 1),
        "eos_token_id": special.get("eos", 2),
        "pad_token_id": special.get("pad", 0),
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "haina": {"position": cfg.position, "head": cfg.head, "rope_base": cfg.rope_base},
    }
    if fmt == "llama":
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", **common,
            "num_key_value_heads": cfg.num_heads, "head_dim": cfg.head_dim,
            "rope_theta": cfg.rope_base, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
            "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1,
        }
    out = {
        "architectures": ["BaichuanForCausalLM"], "model_type": "baichuan", **common,
        "auto_map": {
            "AutoConfig": "configuration_baichuan.BaichuanConfig",
            "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM",
        },
        "tokenizer_class": "BaichuanTokenizer",
        "model_max_length": cfg.max_seq_len,
        "z_loss_weight": 0,
        "gradient_checkpointing": False,
        "position_embedding": cfg.position,  # read by the exported configuration_baichuan.BaichuanConfig
    }
    if cfg.position == "rope":
        out["rope_theta"] = cfg.rope_base
    else:  # as in the 13B (ALiBi) release: no RoPE field, the context length only as model_max_length
        del out["max_position_embeddings"]
    return out


BAICHUAN_POSITIONS = ("rope", "alibi")
# Fields only a RoPE Baichuan config carries: the 7B release's max_position_embeddings sizes its rotary table
# (the 13B release's config has model_max_length alone); the others are transformers' RoPE settings.
_ROPE_FIELDS = ("rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings")
_RELEASE_13B = {"num_hidden_layers": 40, "hidden_size": 5120, "num_attention_heads": 40}


def _baichuan_position(config: dict[str, Any]) -> str:
    """The position encoding a Baichuan-layout config.json declares, read from its own fields; never a guess.

    1. Stated: ``position_embedding`` (the field of the exported ``BaichuanConfig``) and haina's
       ``haina.position`` record. When both are there they must agree.
    2. Release markers, for the Baichuan 2 configs, which state nothing: any RoPE field (``rope_theta``,
       ``rope_scaling``, ``rope_parameters``, ``max_position_embeddings``) means RoPE, as the 7B release
       carries ``max_position_embeddings``; no RoPE field at all, ``model_max_length`` and exactly the 13B
       shape (40 layers, 5120 hidden, 40 heads) means ALiBi, as the 13B release's config is that and no
       more. The shape alone never decides.
    3. Otherwise :class:`HFFormatError`: building the wrong encoding would load without complaint and
       produce garbage.
    """
    sources = {"position_embedding": config.get("position_embedding"),
               "haina.position": (config.get("haina") or {}).get("position")}
    stated = {key: str(value).lower() for key, value in sources.items() if value is not None}
    for key, value in stated.items():
        if value not in BAICHUAN_POSITIONS:
            raise HFFormatError(f"config.json: {key} {value!r} (the baichuan layout has rope or alibi)")
    if len(set(stated.values())) > 1:
        raise HFFormatError(f"config.json: position_embedding {stated['position_embedding']!r} contradicts "
                            f"haina.position {stated['haina.position']!r}")
    if stated:
        return next(iter(stated.values()))
    if any(config.get(key) is not None for key in _ROPE_FIELDS):
        return "rope"
    release_13b = all(config.get(key) == value for key, value in _RELEASE_13B.items())
    if release_13b and config.get("model_max_length") is not None:
        return "alibi"
    raise HFFormatError("config.json: no position encoding stated (set position_embedding to rope or alibi; "
                        "neither a RoPE field nor the 13B release's config is there to tell)")


def model_fields(config: dict[str, Any], fmt: str) -> dict[str, Any]:
    """The haina ``model`` section for an HF config.json; refuses what haina's model cannot represent."""
    try:
        heads = int(config["num_attention_heads"])
        fields: dict[str, Any] = {
            "vocab_size": int(config["vocab_size"]),
            "hidden_size": int(config["hidden_size"]),
            "num_layers": int(config["num_hidden_layers"]),
            "num_heads": heads,
            "ffn_hidden_size": int(config["intermediate_size"]),
            "max_seq_len": int(config.get("max_position_embeddings") or config.get("model_max_length") or 4096),
            "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
            "init_std": float(config.get("initializer_range", 0.02)),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise HFFormatError(f"config.json: missing or bad field {exc}") from None
    if config.get("hidden_act", "silu") != "silu":
        raise HFFormatError(f"config.json: hidden_act {config['hidden_act']!r} (haina's MLP is SwiGLU: silu)")
    if int(config.get("num_key_value_heads") or heads) != heads:
        raise HFFormatError("config.json: grouped-query attention (num_key_value_heads != num_attention_heads)")
    if config.get("head_dim") not in (None, fields["hidden_size"] // heads):
        raise HFFormatError(f"config.json: head_dim {config['head_dim']} != hidden_size / num_attention_heads")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise HFFormatError("config.json: attention/MLP biases are not supported")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise HFFormatError(f"config.json: RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not supported")
    hint = config.get("haina") or {}
    theta = rope.get("rope_theta", config.get("rope_theta", hint.get("rope_base", 10000.0)))
    fields["rope_base"] = float(theta)
    if fmt == "llama":
        fields["position"] = "rope"
        fields["head"] = hint.get("head", "linear")  # a Llama head is an arbitrary matrix: linear is exact
    else:
        fields["position"] = _baichuan_position(config)
        fields["head"] = "normhead"  # the release normalizes lm_head.weight at run time
    return fields


def detect_format(model_dir: Path, config: dict[str, Any]) -> str:
    kind = config.get("model_type")
    if kind in FORMATS:
        return str(kind)
    raise HFFormatError(f"{model_dir}: config.json model_type {kind!r}; pass --format llama|baichuan")


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise HFFormatError(f"{model_dir}: no config.json (not a Hugging Face model directory)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise HFFormatError(f"{path}: not valid JSON ({exc.msg})") from None


# ------------------------------------------------------------------------------------------- files

def write_weights(out: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int = 5 * 2**30) -> list[Path]:
    """safetensors, split into shards with an index past ``max_shard_bytes`` (what HF loaders expect)."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / WEIGHTS), metadata=meta)
        return [out / WEIGHTS]
    files, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        path = out / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path), metadata=meta)
        files.append(path)
        weight_map.update(dict.fromkeys(shard, path.name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")
    return files


class LazyWeights(Mapping[str, torch.Tensor]):
    """The tensors of a model directory by name, each read from its file when asked for (safetensors
    are read tensor by tensor; ``.bin`` files are memory-mapped), so no loader holds the whole model."""

    def __init__(self, files: dict[str, Path], bins: dict[str, dict[str, torch.Tensor]]) -> None:
        self._files, self._bins = files, bins

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name in self._files:
            with safe_open(str(self._files[name]), framework="pt") as f:
                return f.get_tensor(name)
        for tensors in self._bins.values():
            if name in tensors:
                return tensors[name]
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        yield from self._files
        for tensors in self._bins.values():
            yield from tensors

    def __len__(self) -> int:
        return len(self._files) + sum(len(t) for t in self._bins.values())


def read_weights(model_dir: Path) -> LazyWeights:
    """Every tensor of a model directory, lazily: safetensors (single or indexed) or, failing that, PyTorch
    ``.bin`` files (as the Baichuan 2 release ships), read with ``weights_only`` so nothing is unpickled."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if (model_dir / INDEX).is_file():
        names = set(json.loads((model_dir / INDEX).read_text(encoding="utf-8"))["weight_map"].values())
        files = [model_dir / n for n in sorted(names)]
    where: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            where.update(dict.fromkeys(f.keys(), path))
    bins: dict[str, dict[str, torch.Tensor]] = {}
    if not files:
        for path in sorted(model_dir.glob("pytorch_model*.bin")):
            try:
                bins[path.name] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # the legacy (non-zip) format cannot be mapped
                bins[path.name] = torch.load(path, map_location="cpu", weights_only=True)
    weights = LazyWeights(where, bins)
    if not len(weights):
        raise HFFormatError(f"{model_dir}: no *.safetensors or pytorch_model*.bin weights")
    return weights


def write_tokenizer(out: Path, model: Path, fmt: str, max_len: int, roles: tuple[str, str]) -> dict[str, int]:
    """Copy the SentencePiece model and write tokenizer_config.json (+ generation_config.json with the chat
    role ids for baichuan); returns the special ids for config.json."""
    import sentencepiece as spm

    from haina.core.tokenizer import Tokenizer

    Tokenizer(model, field="tokenizer")  # a missing or non-SentencePiece file: one line, not sentencepiece's error
    sp = spm.SentencePieceProcessor(model_file=str(model))
    shutil.copyfile(model, out / TOKENIZER)
    ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": max(sp.pad_id(), sp.unk_id())}
    pieces = {k: sp.id_to_piece(v) for k, v in ids.items() if v >= 0}
    config: dict[str, Any] = {
        "add_bos_token": False,  # haina's data has no bos; documents end with eos
        "add_eos_token": False,
        "bos_token": pieces.get("bos"),
        "eos_token": pieces.get("eos"),
        "unk_token": pieces.get("unk"),
        "pad_token": pieces.get("pad"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "sp_model_kwargs": {},
    }
    if fmt == "llama":
        config.update(tokenizer_class="LlamaTokenizer", legacy=False, add_prefix_space=False)
    else:
        config.update(
            tokenizer_class="BaichuanTokenizer",
            auto_map={"AutoTokenizer": ["tokenization_baichuan.BaichuanTokenizer", None]},
        )
        user, assistant = (sp.piece_to_id(r) for r in roles)
        generation = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"],
                      "user_token_id": user, "assistant_token_id": assistant, "max_new_tokens": 2048}
        (out / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    special = {k: pieces[k] for k in ("bos", "eos", "unk", "pad") if k in pieces}
    (out / "special_tokens_map.json").write_text(
        json.dumps({f"{k}_token": v for k, v in special.items()}, indent=2), encoding="utf-8"
    )
    return {k: v for k, v in ids.items() if v >= 0}
