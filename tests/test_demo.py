"""``haina demo --quick`` through the CLI: every stage of ``make demo`` (corpus, Spark preparation,
tokenizer, weighted shards, pretraining, loss plot, SFT, collection, reward model, PPO, safety) at its
smallest size, with the summary it promises written and consistent with the runs it made."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from haina.core.metrics import read_metrics
from haina.tools.cli import run


def test_the_verdict_says_plainly_which_measure_fell() -> None:
    from haina.tools.demo.align import verdict

    worse = verdict({"task_reward": 0.891, "rm_score": 3.178}, {"task_reward": 0.844, "rm_score": 3.355})
    assert worse == ("PPO on held-out prompts: verified answers fell (0.891 -> 0.844); reward-model score rose "
                     "(3.178 -> 3.355). The policy got fewer answers right: PPO did not improve it.")
    better = verdict({"task_reward": 0.5, "rm_score": 1.0}, {"task_reward": 0.75, "rm_score": 0.9})
    assert "verified answers rose (0.500 -> 0.750)" in better and "score fell" in better and "did not" not in better


@pytest.mark.integration  # Spark and five training runs
@pytest.mark.timeout(900)
def test_quick_demo_runs_every_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    workdir = tmp_path / "demo"
    assert run(["demo", "--quick", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    summary = json.loads((workdir / "summary.json").read_text())
    report = json.loads((workdir / "prepared" / "report.json").read_text())
    assert summary["kept_documents"] == report["kept"]["documents"] > 0
    assert [s["stage"] for s in report["stages"]][:2] == ["exact_dedup", "heuristics"]
    blend = json.loads((workdir / "prepared" / "blend.json").read_text())
    assert blend["datasets"] and all((workdir / "prepared" / f"{d['prefix']}.bin").is_file() for d in blend["datasets"])
    pretrain = [r for r in read_metrics(workdir / "run") if "event" not in r]
    assert summary["first_loss"] == pretrain[0]["loss"] and summary["final_loss"] == pretrain[-1]["loss"]
    assert summary["final_loss"] < summary["first_loss"] and Path(summary["loss_plot"]).stat().st_size > 0
    alignment = summary["alignment"]
    for stage in ("sft", "rm", "ppo"):
        assert (workdir / f"run-{stage}" / "checkpoints" / "latest").is_file(), stage
    rm_eval = json.loads((workdir / "run-rm" / "rm_eval.json").read_text())
    assert alignment["rm_heldout_accuracy"] == rm_eval["accuracy"]
    before, after = alignment["policy_before"], alignment["policy_after"]
    # the verdict names each measure's direction, and says so plainly when the verified answers fell
    assert "PPO on held-out prompts: verified answers" in out
    assert ("did not improve it" in out) == (after["task_reward"] < before["task_reward"])
    assert set(alignment["safety_harmless"]) == {"pretrain", "sft", "ppo"}
    assert (workdir / "safety.png").stat().st_size > 0
