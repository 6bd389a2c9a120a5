"""The parallel engine on CPU with gloo: layout parity with one process, resharding checkpoints, errors.

Every run is a real `haina pretrain --nproc-per-node N` (torchrun) of the tiny preset for a few steps;
the reference is the same config in one process with the same global batch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from haina.core.config import ConfigError, load_config
from haina.core.parallel.mesh import resolve_layout
from tests.parallel_helpers import max_rel_diff, run_pretrain

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


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> dict[str, list[dict]]:
    """One-process runs of STEPS per position encoding (made on first use), shared by every test here."""
    root = tmp_path_factory.mktemp("refs")

    class Lazy(dict):
        def __missing__(self, position: str) -> list[dict]:
            self[position] = run_pretrain(root / position, tiny_data, 1, *STEPS, f"model.position={position}",
                                          "train.save_every=2", "train.log_every=1")
            return self[position]

    return Lazy()


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> dict[tuple[str, str], Path]:
    """Each (position, layout) run of STEPS with checkpoints every 2 steps (made on first use): the layout
    test compares its metrics, the reshard test resumes some of them from their step-2 checkpoint."""
    root = tmp_path_factory.mktemp("layouts")

    class Lazy(dict):
        def __missing__(self, key: tuple[str, str]) -> Path:
            position, layout = key
            nproc, overrides = LAYOUTS[layout]
            run = root / f"{position}-{layout}".replace(" ", "_").replace("=", "")
            run_pretrain(run, tiny_data, nproc, *STEPS, f"model.position={position}", "train.save_every=2", *overrides)
            self[key] = run
            return run

    return Lazy()


def _stopped_at_step_2(run: Path, into: Path) -> Path:
    """A copy of a 4-step run as if it had stopped at its step-2 checkpoint (the schedule is the same:
    decay_steps is fixed); resuming truncates the metrics after it."""
    shutil.copytree(run, into)
    shutil.rmtree(into / "checkpoints" / "step_4")
    (into / "checkpoints" / "latest").write_text("step_2")
    return into


@pytest.mark.integration
@pytest.mark.timeout(600)
@pytest.mark.parametrize(("position", "layout"), CASES, ids=[f"{p}-{n}" for p, n in CASES])
def test_layout_matches_one_process(position: str, layout: str, references: dict, layout_runs: dict) -> None:
    expected = references[position]
    got = [json.loads(line) for line in (layout_runs[position, layout] / "metrics.jsonl").read_text().splitlines()]
    assert max_rel_diff(expected, got, "loss") < 1e-4
    assert max_rel_diff(expected, got, "grad_norm") < 1e-4


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_checkpoint_reshards_between_layouts(
    references: dict, layout_runs: dict, tmp_path: Path, tiny_data: Path
) -> None:
    """Saved under one layout, resumed under another: the next steps match an uninterrupted run (the
    layout tests' one-process RoPE reference, saved every 2 steps like these).

    dp_shard=2 -> one process; tp=2 x pp=2 -> dp_shard=4 (both the layout tests' runs, from step 2);
    dp_shard=4 -> tp=2 x pp=2 (sequence parallel).
    """
    steps = (*STEPS, "train.save_every=2", "train.log_every=1")
    straight = references["rope"]

    half = ("train.steps=2",)  # same schedule (decay_steps fixed), stop at the step-2 checkpoint
    tp_pp = ("parallel.tp=2", "parallel.pp=2")
    _stopped_at_step_2(layout_runs["rope", "dp_shard=2"], tmp_path / "a")
    resumed = run_pretrain(tmp_path / "a", tiny_data, 1, *steps)
    _stopped_at_step_2(layout_runs["rope", "tp=2 sp x pp=2"], tmp_path / "b")
    resumed_from_tp_pp = run_pretrain(tmp_path / "b", tiny_data, 4, *steps, "parallel.dp_shard=4")
    run_pretrain(tmp_path / "c", tiny_data, 4, *steps, "parallel.dp_shard=4", *half)
    resumed_into_tp_pp = run_pretrain(
        tmp_path / "c", tiny_data, 4, *steps, *tp_pp, "parallel.sequence_parallel=true"
    )
    for records in (resumed, resumed_from_tp_pp, resumed_into_tp_pp):
        assert [r["step"] for r in records] == [1, 2, 3, 4]
        assert max_rel_diff(straight, records, "loss") < 1e-5
    for run in ("a", "b"):  # the copies had no step 4: the resumed runs trained steps 3 and 4 themselves
        assert (tmp_path / run / "checkpoints" / "step_4" / "manifest.json").is_file()


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
