"""The single-process training loop: run directory, schedule, accumulation, precision, exact resume."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from haina.core.checkpoint import latest_checkpoint
from haina.core.config import OptimConfig, build_config
from haina.core.metrics import read_metrics
from haina.core.optim import lr_at
from haina.core.train import train
from tests.conftest import EOS, tiny_config


def test_run_directory_and_metrics(tmp_path: Path, tiny_data: Path) -> None:
    cfg = tiny_config(tmp_path / "run", tiny_data)
    result = train(cfg)
    run = tmp_path / "run"
    assert build_config(yaml.safe_load((run / "config.yaml").read_text())) == cfg
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, 9))
    for r in records:
        assert {"step", "loss", "lm_loss", "max_z_loss", "grad_norm", "lr", "tokens_per_s"} <= set(r)
        assert r["loss"] == pytest.approx(r["lm_loss"] + r["max_z_loss"], rel=1e-6)
        assert r["max_z_loss"] > 0 and math.isfinite(r["grad_norm"])
    assert records[-1]["loss"] < records[0]["loss"]
    assert result.final_loss == records[-1]["loss"]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert latest_checkpoint(run / "checkpoints") == run / "checkpoints" / "step_8"
    assert (run / "checkpoints" / "step_4").is_dir()


def test_resume_is_exact(tmp_path: Path, tiny_data: Path) -> None:
    """2N steps in one run == N steps, a new process state, then N more, bit for bit in fp32."""
    common = ("optim.decay_steps=8", "train.save_every=4")
    straight = train(tiny_config(tmp_path / "a", tiny_data, "train.steps=8", *common))
    train(tiny_config(tmp_path / "b", tiny_data, "train.steps=4", *common))
    torch.manual_seed(999)  # disturb the global RNG: the checkpoint must restore it
    resumed = train(tiny_config(tmp_path / "b", tiny_data, "train.steps=8", *common))
    assert [r["step"] for r in resumed.records] == [5, 6, 7, 8]
    losses_a = [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(tmp_path / "a")]
    losses_b = [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(tmp_path / "b")]
    assert losses_a == losses_b
    assert straight.final_loss == resumed.final_loss


def test_gradient_accumulation_matches_bigger_batch(tmp_path: Path, tiny_data: Path) -> None:
    big = train(tiny_config(tmp_path / "big", tiny_data, "train.steps=3", "train.micro_batch_size=4"))
    acc = train(
        tiny_config(tmp_path / "acc", tiny_data, "train.steps=3", "train.micro_batch_size=2", "train.global_batch_size=4")
    )
    for r_big, r_acc in zip(big.records, acc.records, strict=True):
        assert r_acc["loss"] == pytest.approx(r_big["loss"], rel=1e-5)
        assert r_acc["grad_norm"] == pytest.approx(r_big["grad_norm"], rel=1e-4)


def test_bf16_autocast_keeps_fp32_master_weights(
    tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """precision=bf16 is in effect (the loss's matmuls run under bf16 autocast; the losses differ from an
    fp32 run's by rounding only) while the master weights and the checkpoint stay fp32."""
    from haina.core.checkpoint import load_checkpoint
    from haina.core.model import build_model
    from haina.plugins.algorithms import pretrain

    seen: list[torch.dtype | None] = []
    real = pretrain.chunked_lm_loss

    def spy(hidden: torch.Tensor, weight: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        on = torch.is_autocast_enabled("cpu")
        seen.append(torch.get_autocast_dtype("cpu") if on else None)
        assert weight.dtype == torch.float32  # the master copy; autocast casts it for the matmul
        return real(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(pretrain, "chunked_lm_loss", spy)
    losses = {}
    for precision in ("fp32", "bf16"):
        seen.clear()
        cfg = tiny_config(tmp_path / precision, tiny_data, f"train.precision={precision}", "train.steps=3")
        losses[precision] = [r["loss"] for r in train(cfg).records]
        assert set(seen) == ({torch.bfloat16} if precision == "bf16" else {None}), (precision, seen)
    assert all(math.isfinite(x) for x in losses["bf16"])
    assert losses["bf16"] != losses["fp32"] and max(abs(a - b) for a, b in zip(*losses.values(), strict=True)) < 0.1
    model = build_model(cfg, torch.device("cpu"))
    load_checkpoint(latest_checkpoint(tmp_path / "bf16" / "checkpoints"), model)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_warmup_then_cosine_to_min() -> None:
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10)
    lrs = [lr_at(s, cfg, total_steps=110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10], strict=False))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lr_at(60, cfg, 110) == pytest.approx(0.55)
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)
    assert lr_at(500, cfg, 110) == pytest.approx(0.1)


def test_norm_gains_are_not_decayed() -> None:
    from haina.core.config import ModelConfig
    from haina.core.model import Transformer
    from haina.core.optim import param_groups

    model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, max_seq_len=16))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert any(p is model.embed_tokens.weight for p in decay["params"])
    assert any(p is model.norm.weight for p in no_decay["params"])
    assert all(p.ndim == 1 for p in no_decay["params"])


def test_blend_file_feeds_the_blended_dataset(
    tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The samples training consumes come from the blend's parts in its weights (megatron's blended index
    tracks them exactly), each sample from one part's own documents."""
    import json

    from haina.core import data as data_module
    from haina.core.config import ConfigError
    from haina.core.data import resolve_blend
    from tests.conftest import write_indexed

    write_indexed(tmp_path / "shards" / "other", [[1] * 90] * 50)  # token 1 never occurs in tiny_data
    blend = tmp_path / "blend.json"
    blend.write_text(json.dumps({"datasets": [
        {"prefix": "shards/other", "weight": 0.25}, {"prefix": str(tiny_data), "weight": 0.75},
    ]}))
    cfg = build_config({"data": {"blend": str(blend)}})
    prefixes, weights = resolve_blend(cfg.data)
    assert prefixes == [str(tmp_path / "shards" / "other"), str(tiny_data)] and weights == [0.25, 0.75]

    samples: list[torch.Tensor] = []
    real = data_module.PretrainBatches.batch

    def spy(self: Any, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, labels = real(self, index)
        samples.extend(tokens)
        return tokens, labels

    monkeypatch.setattr(data_module.PretrainBatches, "batch", spy)
    run = tiny_config(tmp_path / "run", tiny_data, "train.steps=16", "optim.decay_steps=16", "data.prefixes=[]",
                      f"data.blend={blend}")
    assert train(run).steps == 16
    other = [bool(((s == 1) | (s == EOS)).all()) for s in samples]
    assert all(o or not bool((s == 1).any()) for s, o in zip(samples, other, strict=True))  # never mixed
    assert len(samples) == 32 and abs(sum(other) - 0.25 * len(samples)) <= 1, sum(other)

    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a blend file"):
        resolve_blend(build_config({"data": {"blend": str(tmp_path / "bad.json")}}).data)
    with pytest.raises(ConfigError, match="either blend or prefixes"):
        build_config({"data": {"blend": "x.json", "prefixes": ["y"]}})


@pytest.mark.integration
def test_compiled_training_run_gives_the_eager_losses(
    tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """parallel.compile=true in a training run (the loop's own layout path): its blocks are compiled, the
    parameters keep their names (checkpoints stay loadable), and the losses and gradient norms are the
    eager run's."""
    from haina.core.parallel import parallelize

    compiled_blocks: list[int] = []
    names: list[tuple[list[str], list[str]]] = []
    real = parallelize.apply_compile

    def compile_and_record(part):
        before = [n for n, _ in part.named_parameters()]
        compiled_blocks.append(real(part))
        names.append((before, [n for n, _ in part.named_parameters()]))
        return compiled_blocks[-1]

    monkeypatch.setattr(parallelize, "apply_compile", compile_and_record)
    runs = {}
    for compiled in ("false", "true"):
        cfg = tiny_config(tmp_path / compiled, tiny_data, f"parallel.compile={compiled}", "train.steps=3")
        runs[compiled] = train(cfg).records
    assert compiled_blocks == [2]  # both blocks of the compiled run, none of the eager one
    assert names[0][0] == names[0][1] and any(".layers." in n or n.startswith("layers.") for n in names[0][0])
    for key in ("loss", "grad_norm"):
        eager, compiled = [r[key] for r in runs["false"]], [r[key] for r in runs["true"]]
        assert len(eager) == 3 and max(abs(a - b) / abs(a) for a, b in zip(eager, compiled, strict=True)) < 1e-4, key
