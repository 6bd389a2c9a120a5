"""The parallel engine on CPU with gloo: layout parity with one process, resharding checkpoints, errors.

Every run is the tiny preset's ``train`` under torchrun for a few steps, the runs of one world size in one
launch (:mod:`tests.multi_train`); the reference is the same config in one process with the same global
batch. The CLI's own torchrun launch has its tests in test_launchers and test_reliability_dist.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from haina.core.config import ConfigError, load_config
from haina.core.parallel.mesh import resolve_layout
from tests.parallel_helpers import max_rel_diff, run_pretrains

STEPS = (
    "train.steps=4", "train.micro_batch_size=1", "train.global_batch_size=4", "optim.decay_steps=4",
    "model.num_layers=4",
)

# name -> (processes, overrides)
LAYOUTS = {
    "dp_shard=2": (2, ["parallel.dp_shard=2"]),
    "dp_shard=2 zero2": (2, ["parallel.dp_shard=2", "parallel.reshard_after_forward=false"]),
    "dp_replicate=2 x dp_shard=2": (4, ["parallel.dp_replicate=2", "parallel.dp_shard=2"]),
    "dp_shard=2 full AC": (2, ["parallel.dp_shard=2", "parallel.activation_checkpoint=full"]),
    "1 proc selective AC": (1, ["parallel.activation_checkpoint=selective"]),
    "pp=2 1f1b": (2, ["parallel.pp=2"]),
    "pp=2 interleaved x2": (2, ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2"]),
    "pp=2 x dp_shard=2": (4, ["parallel.pp=2", "parallel.dp_shard=2"]),
    "tp=2": (2, ["parallel.tp=2", "parallel.sequence_parallel=false"]),
    "tp=2 sp x pp=2": (4, ["parallel.tp=2", "parallel.pp=2"]),
    "tp=2 sp x dp_shard=2": (4, ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.dp_shard=2"]),
}


# ALiBi only where the position encoding meets the layout: its slopes are split by head under tp, and its
# bias is built per stage under pp; data parallelism and recomputation never see it.
ALIBI_LAYOUTS = ("pp=2 1f1b", "tp=2", "tp=2 sp x pp=2", "tp=2 sp x dp_shard=2")
CASES = [("rope", name) for name in LAYOUTS] + [("alibi", name) for name in ALIBI_LAYOUTS]


ONE = "one process"


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> dict[tuple[str, str], Path]:
    """Every run of STEPS this module compares (made on first use), checkpoints every 2 steps: the
    one-process reference per position encoding, each (position, layout) case, and the dp_shard=4 run the
    reshard test resumes from; one launch per world size (:func:`run_pretrains`) instead of one per run."""
    root = tmp_path_factory.mktemp("layouts")
    cases = {("rope", ONE): (1, []), ("alibi", ONE): (1, []), **{(p, n): LAYOUTS[n] for p, n in CASES},
             ("rope", "dp_shard=4"): (4, ["parallel.dp_shard=4"])}
    dirs = {key: root / f"{key[0]}-{key[1]}".replace(" ", "_").replace("=", "") for key in cases}
    for world in sorted({nproc for nproc, _ in cases.values()}):
        run_pretrains([
            (f"{p}-{n}", dirs[p, n], [*STEPS, f"model.position={p}", "train.save_every=2", "train.log_every=1", *o])
            for (p, n), (nproc, o) in cases.items() if nproc == world
        ], tiny_data, world)
    return dirs


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _stopped_at_step_2(run: Path, into: Path) -> Path:
    """A copy of a 4-step run as if it had stopped at its step-2 checkpoint (the schedule is the same:
    decay_steps is fixed); resuming truncates the metrics after it."""
    shutil.copytree(run, into)
    shutil.rmtree(into / "checkpoints" / "step_4")
    (into / "checkpoints" / "latest").write_text("step_2")
    return into


@pytest.mark.integration
@pytest.mark.timeout(900)
@pytest.mark.parametrize(("position", "layout"), CASES, ids=[f"{p}-{n}" for p, n in CASES])
def test_layout_matches_one_process(position: str, layout: str, matrix: dict) -> None:
    run, (nproc, overrides) = matrix[position, layout], LAYOUTS[layout]
    # it ran as that layout: one checkpoint shard per process, the layout's settings in its config
    assert len(list((run / "checkpoints" / "step_4").glob("__*_0.distcp"))) == nproc
    saved = load_config(str(run / "config.yaml"))
    for override in overrides:
        key, value = override.split("=")
        section, name = key.split(".")
        assert str(getattr(getattr(saved, section), name)).lower() == value, override
    expected, got = _records(matrix[position, ONE]), _records(run)
    assert max_rel_diff(expected, got, "loss") < 1e-4
    assert max_rel_diff(expected, got, "grad_norm") < 1e-4


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_checkpoint_reshards_between_layouts(matrix: dict, tmp_path: Path, tiny_data: Path) -> None:
    """Saved under one layout, resumed under another: the next steps match an uninterrupted run (the
    one-process RoPE reference). The layout runs stopped at their step-2 checkpoint:

    dp_shard=2 -> one process; tp=2 x pp=2 -> dp_shard=4; dp_shard=4 -> tp=2 x pp=2 (sequence parallel).
    """
    steps = (*STEPS, "train.save_every=2", "train.log_every=1")
    straight = _records(matrix["rope", ONE])
    tp_pp = ("parallel.tp=2", "parallel.pp=2")
    a = _stopped_at_step_2(matrix["rope", "dp_shard=2"], tmp_path / "a")
    b = _stopped_at_step_2(matrix["rope", "tp=2 sp x pp=2"], tmp_path / "b")
    c = _stopped_at_step_2(matrix["rope", "dp_shard=4"], tmp_path / "c")
    resumed = run_pretrains([("a", a, list(steps))], tiny_data, 1)["a"]
    four = run_pretrains([("b", b, [*steps, "parallel.dp_shard=4"]),
                          ("c", c, [*steps, *tp_pp, "parallel.sequence_parallel=true"])], tiny_data, 4)
    for records in (resumed, four["b"], four["c"]):
        assert [r["step"] for r in records] == [1, 2, 3, 4]
        assert max_rel_diff(straight, records, "loss") < 1e-5
    for run in (a, b, c):  # the copies had no step 4: the resumed runs trained steps 3 and 4 themselves
        assert (run / "checkpoints" / "step_4" / "manifest.json").is_file()


@pytest.mark.parametrize(
    ("world", "overrides", "message"),
    [
        (4, ["parallel.tp=3"], "tp*pp*dp_replicate = 3 does not divide the world size 4"),
        (4, ["parallel.tp=4", "model.num_heads=2", "model.hidden_size=64"], "does not divide model.num_heads 2"),
        (2, ["parallel.tp=2", "model.vocab_size=511"], "does not divide model.vocab_size 511"),
        (2, ["parallel.tp=2", "parallel.sequence_parallel=true", "train.seq_len=31"],
         "does not divide train.seq_len 31"),
        (4, ["parallel.pp=4", "model.num_layers=2"], "4 pipeline stages (pp x pp_virtual_stages) for only 2 layers"),
        (2, ["parallel.dp_shard=4"], "but the world size is 2"),
        (2, ["parallel.dp_shard=2", "train.global_batch_size=3"], "not a multiple of micro_batch_size"),
        (2, ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b"], "interleaved_1f1b needs at least 2"),
        (2, ["parallel.pp=2", "parallel.pp_stage_layers=[1,2]"], "must be 2 positive counts (pp x pp_virtual_stages) "
         "summing to model.num_layers 2"),
    ],
)
def test_layout_errors_are_one_line(world: int, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_layout(load_config("tiny", overrides), world)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_layout_fills_dp_shard_and_accumulation() -> None:
    layout = resolve_layout(load_config("tiny", ["parallel.tp=2", "train.global_batch_size=8"]), 8)
    assert (layout.pp, layout.dp_replicate, layout.dp_shard, layout.tp) == (1, 1, 4, 2)
    assert layout.grad_accum == 1 and layout.world_size == 8


def test_pipeline_stages_keep_full_model_names() -> None:
    from haina.core.config import ModelConfig
    from haina.core.model import Transformer
    from haina.core.parallel.pipeline import stage_indices, stage_layer_ranges, stage_module

    assert stage_layer_ranges(4, 2) == [range(0, 2), range(2, 4)]
    assert stage_layer_ranges(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert stage_layer_ranges(5, 4)[-1] == range(4, 5)
    assert stage_indices(1, 2, 2) == [1, 3]
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=2, max_seq_len=16))
    first = stage_module(model, range(0, 2), first=True, last=False)
    last = stage_module(model, range(2, 4), first=False, last=True)
    full = set(model.state_dict())
    assert set(first.state_dict()) | set(last.state_dict()) == full
    assert not set(first.state_dict()) & set(last.state_dict())
    assert "layers.2.mlp.down_proj.weight" in last.state_dict() and last.embed_tokens is None
    assert first.head is None and first.norm is None


@pytest.mark.integration
def test_zero_bubble_refused_in_one_line(tmp_path: Path, tiny_data: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "haina.tools.cli", "pretrain", "--nproc-per-node", "2", "--config", "tiny",
         "parallel.pp=2", "parallel.pp_schedule=zero_bubble", f"train.run_dir={tmp_path}",
         f"data.prefixes=[{tiny_data}]", *STEPS],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "zero_bubble splits backward into input and weight passes" in proc.stdout + proc.stderr
