"""Reliability in one process: crash mid-save, damaged checkpoints, safe metadata, NaN/spike guard, SIGTERM."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from haina.core import faults
from haina.core.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, load_model_weights
from haina.core.checkpoint_reader import SafeReader
from haina.core.files import MANIFEST, write_manifest
from haina.core.guard import NONFINITE_GRAD, NONFINITE_LOSS, OK, SPIKE, SpikeGuard
from haina.core.metrics import read_metrics
from haina.core.model import build_model
from haina.core.preempt import Preempted
from haina.core.train import train
from tests.conftest import one_line_error, tiny_config

COMMON = ("optim.decay_steps=8", "train.save_every=4", "train.steps=8")


def _trajectory(run: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(run) if "event" not in r]


def _events(run: Path) -> list[dict]:
    return [r for r in read_metrics(run) if "event" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """An uninterrupted 8-step run: the trajectory every recovered run must reproduce exactly."""
    run = tmp_path_factory.mktemp("reference") / "run"
    train(tiny_config(run, tiny_data, *COMMON))
    return run


@pytest.mark.parametrize("point", ["save_written", "save_manifest", "save_renamed"])
def test_crash_during_checkpoint_write_keeps_previous(
    point: str, reference: Path, tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Crash while step 8 is being published: step 4 stays ``latest`` and loads; a rerun ends exactly."""
    run = tmp_path / "run"
    monkeypatch.setenv(faults.ENV, f"{point}:crash@8")
    with pytest.raises(faults.InjectedFault):
        train(tiny_config(run, tiny_data, *COMMON))
    monkeypatch.delenv(faults.ENV)
    checkpoints = run / "checkpoints"
    assert latest_checkpoint(checkpoints) == checkpoints / "step_4"
    if point != "save_renamed":
        assert (checkpoints / ".step_8.partial" / ".metadata").is_file() and not (checkpoints / "step_8").exists()
    model = build_model(tiny_config(run, tiny_data), torch.device("cpu"))
    assert load_checkpoint(checkpoints / "step_4", model).step == 4
    train(tiny_config(run, tiny_data, *COMMON))  # resumes from step 4
    assert _trajectory(run) == _trajectory(reference)
    assert not list(checkpoints.glob(".step_*"))


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "altered"])
@pytest.mark.parametrize("name", ["__0_0.distcp", ".metadata"])
def test_damaged_checkpoint_file_is_named(
    name: str, how: str, reference: Path, tmp_path: Path, tiny_data: Path
) -> None:
    step = tmp_path / "step_8"
    shutil.copytree(reference / "checkpoints" / "step_8", step)
    _damage(step / name, how)
    model = build_model(tiny_config(tmp_path, tiny_data), torch.device("cpu"))
    message = one_line_error(load_checkpoint, step, model)
    assert str(step / name) in message and ("truncated" if how == "truncated" else "altered") in message
    assert str(step / name) in one_line_error(load_model_weights, step, model)


def test_checkpoint_without_manifest_is_refused(reference: Path, tmp_path: Path, tiny_data: Path) -> None:
    step = tmp_path / "step_8"
    shutil.copytree(reference / "checkpoints" / "step_8", step)
    (step / MANIFEST).unlink()
    model = build_model(tiny_config(tmp_path, tiny_data), torch.device("cpu"))
    assert "no manifest.json" in one_line_error(load_checkpoint, step, model)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_metadata_pickle_cannot_run_code(reference: Path, tmp_path: Path, tiny_data: Path) -> None:
    """A .metadata carrying a callable is refused even when the manifest was rewritten to match."""
    step = tmp_path / "step_8"
    shutil.copytree(reference / "checkpoints" / "step_8", step)
    (step / ".metadata").write_bytes(pickle.dumps(_Evil()))
    write_manifest(step)
    with pytest.raises(CheckpointError, match="posix.system is not allowed|os.system is not allowed"):
        SafeReader(str(step)).read_metadata()
    # a genuine checkpoint's metadata still reads, with every parameter under its name and global shape
    stored = SafeReader(str(reference / "checkpoints" / "step_8")).read_metadata().state_dict_metadata
    model = build_model(tiny_config(tmp_path, tiny_data), torch.device("cpu"))
    for name, param in model.named_parameters():
        assert tuple(stored[f"model.{name}"].size) == tuple(param.shape), name
    assert tuple(stored["model.embed_tokens.weight"].size) == (512, 64)
    assert isinstance(torch.load(io.BytesIO(_tensor_bytes()), weights_only=True), torch.Tensor)


def _tensor_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save(torch.ones(2), buffer)
    return buffer.getvalue()


def test_keeps_last_k_checkpoints(tmp_path: Path, tiny_data: Path) -> None:
    run = tmp_path / "run"
    train(tiny_config(run, tiny_data, "train.steps=6", "train.save_every=1", "train.keep_checkpoints=2"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_5", "step_6"]


def test_nan_batch_skips_the_update(tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN loss on batch 3: no update, an event, training goes on with finite losses."""
    run = tmp_path / "run"
    monkeypatch.setenv(faults.ENV, "loss:nan@3")
    train(tiny_config(run, tiny_data, "train.steps=6", "train.save_every=100"))
    (event,) = _events(run)
    assert event["step"] == 3 and event["event"] == "nonfinite_grad_norm" and event["update"] == "skipped"
    losses = [loss for step, loss, _ in _trajectory(run) if step != 3]
    assert len(losses) == 5 and all(torch.isfinite(torch.tensor(losses)))


def test_repeated_bad_steps_roll_back_past_the_data(
    tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches 5-7 poisoned: three skips, a rollback to step 4, then steps 5-8 on batches 8-11."""
    run = tmp_path / "run"
    monkeypatch.setenv(faults.ENV, "loss:nan@5-7")
    result = train(tiny_config(run, tiny_data, *COMMON, "train.guard.max_bad_steps=3"))
    events = _events(run)
    assert [(e["step"], e["event"]) for e in events] == [
        (5, "nonfinite_grad_norm"), (6, "nonfinite_grad_norm"), (7, "nonfinite_grad_norm"), (7, "rollback"),
    ]
    assert events[-1]["to_step"] == 4 and events[-1]["skipped_samples"] == 3 * 2
    assert result.steps == 8 and torch.isfinite(torch.tensor(result.final_loss))
    assert [step for step, *_ in _trajectory(run)] == [1, 2, 3, 4, 5, 6, 7, 5, 6, 7, 8]


def test_sigterm_saves_and_resumes_exactly(
    reference: Path, tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    monkeypatch.setenv(faults.ENV, "step_end:sigterm@3")
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted) as info:
        train(tiny_config(run, tiny_data, *COMMON))
    assert info.value.code == 128 + signal.SIGTERM and signal.getsignal(signal.SIGTERM) == before
    assert latest_checkpoint(run / "checkpoints") == run / "checkpoints" / "step_3"
    assert _events(run)[-1] == {"step": 3, "event": "preempted", "signal": 15, "exit_code": 143,
                                "checkpoint": "step_3"}
    monkeypatch.delenv(faults.ENV)
    train(tiny_config(run, tiny_data, *COMMON))
    assert _trajectory(run) == _trajectory(reference)


def test_guard_verdicts_and_state() -> None:
    cfg = SimpleNamespace(enabled=True, window=10, warmup=4, sigma=3.0, min_margin=0.0, max_bad_steps=2)
    guard = SpikeGuard(cfg)
    assert guard.verdict(float("nan"), 1.0) == NONFINITE_LOSS
    assert guard.verdict(1.0, float("inf")) == NONFINITE_GRAD
    assert guard.verdict(100.0, 1.0) == OK  # no statistics before the warm-up
    for loss in (2.0, 2.1, 1.9, 2.0):
        assert not guard.record(loss, OK)
    assert guard.verdict(2.2, 1.0) == OK and guard.verdict(5.0, 1.0) == SPIKE
    assert not guard.record(5.0, SPIKE) and guard.record(5.0, SPIKE)  # the second bad step in a row
    again = SpikeGuard(cfg)
    again.load_state_dict(guard.state_dict())
    assert again.state_dict() == guard.state_dict() and again.verdict(5.0, 1.0) == SPIKE
    assert SpikeGuard(SimpleNamespace(**{**vars(cfg), "enabled": False})).verdict(float("nan"), 1.0) == OK


def test_sft_resumes_exactly_from_its_run_directory(tmp_path: Path) -> None:
    """Alignment commands resume from ``latest`` of their own run by default (not from ``--from`` again)."""
    from haina.core.config import alignment_config
    from tests.alignment_helpers import make_alignment_data

    data = make_alignment_data(tmp_path / "data")
    pt = tmp_path / "pt"
    train(tiny_config(pt, data.pretrain_prefix, f"data.tokenizer={data.tokenizer}", "train.steps=2"))
    short = ("train.log_every=1", "train.save_every=2", "optim.warmup_steps=0", "optim.decay_steps=4")

    def sft(run: Path, steps: int) -> list[int]:
        overrides = [f"align.data={data.sft}", f"train.run_dir={run}", f"train.steps={steps}", *short]
        return [r["step"] for r in train(alignment_config("sft", str(pt), None, overrides)).records]

    assert sft(tmp_path / "straight", 4) == [1, 2, 3, 4]
    assert sft(tmp_path / "resumed", 2) == [1, 2]
    assert sft(tmp_path / "resumed", 4) == [3, 4]
    assert _trajectory(tmp_path / "resumed") == _trajectory(tmp_path / "straight")


def test_full_disk_during_a_save_is_one_line_and_the_run_resumes(
    reference: Path, tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """ENOSPC while step 8 is written: exit 2 with one line naming the folder and the space, the partial
    folder gone at once, step 4 still ``latest``; the rerun ends on the uninterrupted trajectory."""
    import errno

    import torch.distributed.checkpoint.filesystem as dcp_fs

    from haina.tools.cli import run as cli

    real = dcp_fs._FileSystemWriter.write_data

    def full_disk(self: Any, plan: Any, planner: Any) -> Any:
        if "step_8" in str(self.path):
            (Path(self.path) / "__0_0.distcp").write_bytes(b"\0" * 4096)  # what fitted before the disk filled
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, plan, planner)

    monkeypatch.setattr(dcp_fs._FileSystemWriter, "write_data", full_disk)
    run = tmp_path / "run"
    argv = ["pretrain", "--config", "tiny", f"train.run_dir={run}", f"data.prefixes=[{tiny_data}]", *COMMON]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "step_8: checkpoint write failed" in err and "No space left on device" in err
    assert "free on" in err and "a checkpoint needs about" in err and "step_4 stays the latest" in err
    checkpoints = run / "checkpoints"
    assert latest_checkpoint(checkpoints) == checkpoints / "step_4"
    assert not list(checkpoints.glob(".step_*")) and not (checkpoints / "step_8").exists()
    monkeypatch.undo()
    train(tiny_config(run, tiny_data, *COMMON))
    assert _trajectory(run) == _trajectory(reference)


def test_every_leftover_of_a_cut_publish_is_cleaned_on_start(reference: Path, tmp_path: Path, tiny_data: Path) -> None:
    """A kill between the publish steps can leave ``.step_N.old`` (a replaced folder not yet removed) and
    ``.latest.tmp`` (a pointer not yet renamed): the next start removes them and resumes from ``latest``."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    checkpoints = run / "checkpoints"
    shutil.copytree(checkpoints / "step_4", checkpoints / ".step_8.old")
    shutil.copytree(checkpoints / "step_4", checkpoints / ".step_12.partial")
    (checkpoints / ".latest.tmp").write_text("step_")
    train(tiny_config(run, tiny_data, *COMMON, "train.steps=10", "optim.decay_steps=10"))
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith(".")) == []
    assert (checkpoints / "latest").read_text().strip() == "step_10"


def test_resume_from_a_damaged_latest_checkpoint_is_one_line(
    reference: Path, tmp_path: Path, tiny_data: Path, capsys: pytest.CaptureFixture
) -> None:
    from haina.tools.cli import run as cli

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shard = run / "checkpoints" / "step_8" / "__0_0.distcp"
    _damage(shard, "truncated")
    argv = ["pretrain", "--config", "tiny", f"train.run_dir={run}", f"data.prefixes=[{tiny_data}]", *COMMON,
            "train.steps=12", "optim.decay_steps=12"]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and str(shard) in err and "truncated" in err, err


def test_torch_checkpoint_exception_is_reported_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """torch's CheckpointException derives from BaseException: the CLI still prints its one failure line."""
    from torch.distributed.checkpoint.api import CheckpointException

    import haina.core.train as train_module
    from haina.tools.cli import run as cli

    def fail(cfg: Any) -> None:
        raise CheckpointException("load failed", {0: (RuntimeError("size mismatch for layers.0"), None)})

    monkeypatch.setattr(train_module, "train", fail)
    assert cli(["pretrain", "--config", "tiny", f"train.run_dir={tmp_path / 'run'}"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("haina pretrain: failed: CheckpointException"), err


def test_sigint_checkpoints_the_step_and_exits_130(
    reference: Path, tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C (SIGINT) at step 3: step 3 is saved, the process leaves with 128 + 2, and a rerun ends exactly."""
    run = tmp_path / "run"
    monkeypatch.setenv(faults.ENV, "step_end:sigint@3")
    with pytest.raises(Preempted) as info:
        train(tiny_config(run, tiny_data, *COMMON))
    assert info.value.code == 130
    assert latest_checkpoint(run / "checkpoints") == run / "checkpoints" / "step_3"
    assert [(e["step"], e["event"], e["signal"]) for e in _events(run)] == [(3, "preempted", 2)]
    monkeypatch.delenv(faults.ENV)
    train(tiny_config(run, tiny_data, *COMMON))
    assert _trajectory(run) == _trajectory(reference)


def test_a_fault_fires_on_its_rank_and_attempt_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """``#attempt`` picks the torchrun attempt (TORCHELASTIC_RESTART_COUNT) a fault fires on; without it,
    the first only, so a restarted run goes on past the fault."""
    monkeypatch.setenv(faults.ENV, "step_end:sigkill@3:0,step_end:sigterm@5:1#1,loss:nan@2-4")
    for attempt, expected in ((None, {(3, 0): "sigkill", (3, 1): None, (5, 1): None}),
                              ("0", {(3, 0): "sigkill", (5, 1): None}),
                              ("1", {(3, 0): None, (5, 1): "sigterm", (5, 0): None}),
                              ("2", {(3, 0): None, (5, 1): None})):
        if attempt is None:
            monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
        else:
            monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", attempt)
        assert {key: faults.action("step_end", *key) for key in expected} == expected, attempt
        assert faults.action("loss", 4) == ("nan" if attempt in (None, "0") else None), attempt


def test_end_worker_exits_with_its_code_after_what_an_ordinary_exit_does(tmp_path: Path) -> None:
    """A torchrun worker's end (haina.core.distributed.end_worker) skips only the interpreter's teardown:
    the exit code is kept, a non-daemon thread is waited for, exit handlers run, unflushed output lands."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import atexit, sys, threading
        from pathlib import Path
        from haina.core.distributed import end_worker
        out = Path({str(tmp_path)!r})
        go = threading.Event()
        def late():
            go.wait()
            (out / "thread").write_text(str(sum(range(3_000_000)) > 0))  # still busy when end_worker starts
        threading.Thread(target=late).start()
        atexit.register(lambda: (out / "atexit").write_text("ran"))
        sys.stdout.write("unflushed")
        go.set()
        end_worker(7)
        (out / "after").write_text("never")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout == "unflushed"
    assert (tmp_path / "thread").read_text() == "True" and (tmp_path / "atexit").read_text() == "ran"
    assert not (tmp_path / "after").exists()
