"""The DeepSpeed ZeRO backend on the CPU (gloo, DeepSpeed's CPU accelerator): parity with FSDP2, resume,
the guard, checkpoint conversion and one-line errors. The alignment algorithms run on it in test_alignment."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from haina.core.checkpoint import latest_checkpoint, load_checkpoint, load_model_weights
from haina.core.config import load_config
from haina.core.metrics import read_metrics
from haina.core.model import Transformer
from haina.core.parallel.mesh import resolve_layout
from haina.core.parallel.zero import convert_checkpoint, deepspeed_config
from tests.alignment_helpers import haina
from tests.conftest import one_line_error
from tests.parallel_helpers import max_rel_diff, run_many, run_pretrains

# 2 processes x micro-batch 1 x 2 accumulation steps: gradient accumulation is part of the parity
COMMON = ("train.steps=5", "train.micro_batch_size=1", "train.global_batch_size=4", "optim.decay_steps=5",
          "train.save_every=2")
DS = "parallel.dp_backend=deepspeed"
# ZeRO-1 runs with CPU Adam (offload_optimizer): one run covers both; plain ZeRO-1 has the spike test below
STAGES = {
    "zero1-offload": (DS, "deepspeed.zero_stage=1", "deepspeed.offload_optimizer=true"),
    "zero2": (DS, "deepspeed.zero_stage=2"),
    "zero3": (DS, "deepspeed.zero_stage=3"),
}


def _trajectory(run: Path) -> list[dict]:
    return [r for r in read_metrics(run) if "event" not in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> dict[str, Path]:
    """The same 5 fp32 steps on 2 processes: FSDP2, and ZeRO-1 (with CPU Adam), -2 and -3."""
    root = tmp_path_factory.mktemp("deepspeed")
    out = {name: root / name for name in ("fsdp2", *STAGES)}
    run_pretrains([("fsdp2", out["fsdp2"], list(COMMON)),
                   *((name, out[name], [*COMMON, *overrides]) for name, overrides in STAGES.items())], tiny_data, 2)
    return out


# One-process runs (the guard, spike and bf16-offload tests below), all in one launch of tests.multi_train:
# name -> (overrides, HAINA_FAULTS)
GUARD = ("train.steps=8", "train.save_every=4", "train.guard.max_bad_steps=3", *STAGES["zero2"])
SPIKE = ("train.steps=6", "optim.decay_steps=8", "train.save_every=1", "train.keep_checkpoints=3", "train.guard.warmup=3")
BF16 = ("train.steps=3", "train.save_every=3", "train.precision=bf16")
ONE_PROCESS = {
    "guard": (GUARD, "loss:nan@3,loss:nan@5-7"),
    "spike-fsdp2": (SPIKE, "loss:spike@6"),
    "spike-deepspeed": ((*SPIKE, DS, "deepspeed.zero_stage=1"), "loss:spike@6"),
    "bf16-fsdp2": (BF16, ""),
    "bf16-offload": ((*BF16, *STAGES["zero3"], "deepspeed.offload_params=true"), ""),
}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("deepspeed-one")
    run_many([{"name": name, "faults": fault,
               "overrides": [f"train.run_dir={root / name}", f"data.prefixes=[{tiny_data}]", *overrides]}
              for name, (overrides, fault) in ONE_PROCESS.items()], 1)
    return {name: root / name for name in ONE_PROCESS}


@pytest.mark.integration
@pytest.mark.timeout(900)
@pytest.mark.parametrize("stage", list(STAGES))
def test_zero_stage_matches_fsdp2(stage: str, runs: dict[str, Path]) -> None:
    fsdp2, zero = _trajectory(runs["fsdp2"]), _trajectory(runs[stage])
    assert [r["step"] for r in zero] == [1, 2, 3, 4, 5]
    assert max_rel_diff(fsdp2, zero, "loss") < 1e-4
    assert max_rel_diff(fsdp2, zero, "grad_norm") < 1e-4
    assert zero[-1]["loss"] < zero[0]["loss"] - 1.0  # it trains: the lr and the updates are applied
    checkpoints = runs[stage] / "checkpoints"
    assert latest_checkpoint(checkpoints) == checkpoints / "step_5"
    assert (checkpoints / "step_5" / "manifest.json").is_file()


@pytest.mark.integration
def test_zero3_resume_is_exact(runs: dict[str, Path], tiny_data: Path, tmp_path: Path) -> None:
    """Stop at the step-2 checkpoint (same schedule: decay_steps is fixed), resume to step 5."""
    run = tmp_path / "resumed"
    run_pretrains([("half", run, [*COMMON, *STAGES["zero3"], "train.steps=2"]),
                   ("resumed", run, [*COMMON, *STAGES["zero3"]])], tiny_data, 2)
    resumed, straight = _trajectory(run), _trajectory(runs["zero3"])
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    for a, b in zip(resumed, straight, strict=True):
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"]), a["step"]


@pytest.mark.integration
def test_conversion_gives_the_same_logits(runs: dict[str, Path], tmp_path: Path) -> None:
    """ZeRO-3 shards -> a haina checkpoint: it loads strictly and computes what the FSDP2 run's weights do;
    the DeepSpeed checkpoint also loads directly (init_from) into the same tensors."""
    converted = tmp_path / "converted"
    haina("import", "deepspeed", "--checkpoint", str(runs["zero3"]), "--out", str(converted))
    cfg = load_config(str(converted / "config.yaml"))
    assert cfg.parallel.dp_backend == "fsdp2" and latest_checkpoint(converted / "checkpoints").name == "step_5"
    models = {}
    for name, source in (("converted", converted), ("direct", runs["zero3"]), ("fsdp2", runs["fsdp2"])):
        models[name] = Transformer(cfg.model)
        assert load_model_weights(source, models[name]) == []  # every parameter found, with its shape
    for a, b in zip(models["converted"].state_dict().values(), models["direct"].state_dict().values(), strict=True):
        assert torch.equal(a, b)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = {name: m(tokens, logits=slice(None)) for name, m in models.items()}
    scale = logits["fsdp2"].abs().max()
    assert (logits["converted"] - logits["fsdp2"]).abs().max() / scale < 1e-4
    from haina.tools.hf.export import export_hf

    assert (export_hf(str(converted), str(tmp_path / "hf"), "llama") / "config.json").is_file()


@pytest.mark.integration
def test_checkpoint_of_the_other_backend_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    step = latest_checkpoint(runs["zero2"] / "checkpoints")
    model = Transformer(load_config("tiny").model)
    message = one_line_error(load_checkpoint, step, [model], [torch.optim.AdamW(model.parameters())])
    assert "DeepSpeed checkpoint" in message and "haina import deepspeed" in message
    not_ds = tmp_path / "copy"
    shutil.copytree(runs["fsdp2"], not_ds)
    message = one_line_error(convert_checkpoint, not_ds, tmp_path / "out")
    assert "not a DeepSpeed checkpoint" in message


@pytest.mark.integration
def test_guard_skips_and_rolls_back_on_deepspeed(one_process: dict[str, Path]) -> None:
    """A NaN loss on batch 3: DeepSpeed skips the update and step 4 trains on unharmed weights. Batches 5-7:
    three skips, then the run reloads step 4 and goes on past the bad data."""
    run = one_process["guard"]
    events = [r for r in read_metrics(run) if "event" in r]
    assert [(e["step"], e["event"]) for e in events] == [
        (3, "nonfinite_loss"), (5, "nonfinite_loss"), (6, "nonfinite_loss"), (7, "nonfinite_loss"), (7, "rollback"),
    ]
    assert events[-1]["to_step"] == 4 and events[-1]["skipped_samples"] == 3 * 2
    trajectory = _trajectory(run)
    assert [r["step"] for r in trajectory] == [1, 2, 3, 4, 5, 6, 7, 5, 6, 7, 8]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in [trajectory[3], *trajectory[7:]])


@pytest.mark.integration
def test_loss_spike_is_skipped_as_on_fsdp2(one_process: dict[str, Path]) -> None:
    """A finite spike (batch 6's loss x1000) leaves the weights alone on either backend: the checkpoint
    after step 6 holds exactly the weights after step 5 (which step 5 itself changed), and the trajectory
    matches FSDP2's. DeepSpeed gets a NaN backward for the spike and skips; FSDP2 does not step."""
    trajectories = {}
    for backend in ("fsdp2", "deepspeed"):
        run = one_process[f"spike-{backend}"]
        events = [r for r in read_metrics(run) if "event" in r]
        assert [(e["step"], e["event"]) for e in events] == [(6, "loss_spike")]
        trajectories[backend] = _trajectory(run)
        weights = {}
        for step in (4, 5, 6):
            model = Transformer(load_config("tiny").model)
            load_model_weights(run / "checkpoints" / f"step_{step}", model)
            weights[step] = model.state_dict()
        for name, w5 in weights[5].items():
            assert torch.equal(weights[6][name], w5), (backend, name)
        assert any(not torch.equal(weights[4][n], weights[5][n]) for n in weights[5])  # a normal step moves them
    assert max_rel_diff(trajectories["fsdp2"], trajectories["deepspeed"], "loss") < 1e-4


def test_config_is_derived_from_haina_fields() -> None:
    cfg = load_config("tiny", [
        DS, "deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true", "deepspeed.offload_params=true",
        "train.micro_batch_size=1", "train.global_batch_size=8", "train.precision=bf16", "optim.clip_grad=0.7",
        "deepspeed.config={zero_optimization: {overlap_comm: true}, communication_data_type: fp32}",
    ])
    config = deepspeed_config(cfg, resolve_layout(cfg, 2))
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"]) == (1, 4, 8)
    assert config["gradient_clipping"] == 0.7 and config["bf16"]["enabled"]
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["overlap_comm"] is True
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    assert config["communication_data_type"] == "fp32"
    assert "bf16" not in deepspeed_config(load_config("tiny", [DS]), resolve_layout(load_config("tiny"), 1))


@pytest.mark.parametrize(("overrides", "expected"), [
    ((DS, "parallel.tp=2"), "parallel.tp must be 1"),
    ((DS, "parallel.pp=2"), "parallel.pp must be 1"),
    ((DS, "parallel.compile=true"), "parallel.compile"),
    (("deepspeed.offload_params=true",), "offload_params needs zero_stage 3"),
    (("deepspeed.config={gradient_clipping: 1.0}",), "optim.clip_grad"),
    (("deepspeed.config={zero_optimization: {stage: 3}}",), "deepspeed.zero_stage"),
    (("deepspeed.zero_stage=4",), "deepspeed.zero_stage"),
])
def test_bad_deepspeed_config_is_one_line(overrides: tuple[str, ...], expected: str) -> None:
    assert expected in one_line_error(load_config, "tiny", list(overrides))


@pytest.mark.integration
def test_zero3_with_offloaded_parameters_in_bf16_trains(one_process: dict[str, Path]) -> None:
    """``deepspeed.offload_params`` (ZeRO-3 parameters in CPU memory) with ``train.precision=bf16``: the
    losses follow FSDP2's bf16 run within bf16 rounding, and the saved weights are fp32 masters."""
    losses = {name: [r["loss"] for r in _trajectory(one_process[f"bf16-{name}"])] for name in ("fsdp2", "offload")}
    assert len(losses["offload"]) == 3
    assert max(abs(a - b) for a, b in zip(losses["fsdp2"], losses["offload"], strict=True)) < 0.05
    model = Transformer(load_config("tiny").model)
    load_model_weights(one_process["bf16-offload"], model)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_cpu_runs_do_not_build_the_shared_memory_op() -> None:
    """DeepSpeed's own ``deepspeed.comm.torch`` is patched (not the ``torch`` package that ``import
    deepspeed.comm.torch as m`` binds): its CPU backend then skips compiling the inference all-reduce."""
    import sys

    from haina.core.parallel.zero_state import import_deepspeed

    import_deepspeed(torch.device("cpu"))
    assert sys.modules["deepspeed.comm.torch"].build_shm_op() is None
    assert not hasattr(torch, "build_shm_op")
