"""``haina demo --quick`` through the CLI: every stage of ``make demo`` (corpus, Spark preparation,
tokenizer, weighted shards, pretraining, loss plot, SFT, collection, reward model, PPO, safety) at its
smallest size, with the summary it promises written and consistent with the runs it made."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from haina.core.metrics import read_metrics
from haina.tools.cli import run
from tests.data_helpers import spark  # noqa: F401  (session fixture)


def test_the_verdict_says_plainly_which_measure_fell() -> None:
    from haina.tools.demo.align import verdict

    worse = verdict("PPO", {"verified": 0.891, "rm_score": 3.178, "kl": 0.0},
                    {"verified": 0.844, "rm_score": 3.355, "kl": 0.25})
    assert worse == ("PPO on held-out prompts: verified answers fell (0.891 -> 0.844); reward-model score rose "
                     "(3.178 -> 3.355); KL to the SFT model 0.250. The policy got fewer answers right: PPO did not "
                     "improve it.")
    better = verdict("GRPO", {"verified": 0.5, "rm_score": 1.0, "kl": 0.0}, {"verified": 0.75, "rm_score": 0.9, "kl": 0.1})
    assert "verified answers rose (0.500 -> 0.750)" in better and "score fell" in better and "did not" not in better


@pytest.mark.integration  # Spark and five training runs
@pytest.mark.timeout(900)
def test_quick_demo_runs_every_stage(
    spark, tmp_path: Path, capsys: pytest.CaptureFixture[str]  # noqa: F811  (the demo's Spark job reuses it)
) -> None:
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
    for stage in ("sft", "rm", "ppo", "grpo"):
        assert (workdir / f"run-{stage}" / "checkpoints" / "latest").is_file(), stage
    rm_eval = json.loads((workdir / "run-rm" / "rm_eval.json").read_text())
    assert alignment["rm_heldout_accuracy"] == rm_eval["accuracy"]
    policies = alignment["policies"]
    assert set(policies) == {"sft", "ppo", "grpo"} and policies["sft"]["kl"] == 0.0
    text = " ".join(out.split())  # the console wraps lines
    for name in ("ppo", "grpo"):
        # each verdict names each measure's direction, and says so plainly when the verified answers fell
        assert f"{name.upper()} on held-out prompts: verified answers" in text
        fell = policies[name]["verified"] < policies["sft"]["verified"]
        assert (f"{name.upper()} did not improve it" in text) == fell, name
    assert set(alignment["safety_harmless"]) == {"pretrain", "sft", "ppo", "grpo"}
    assert (workdir / "safety.png").stat().st_size > 0
    # the RL benchmark reruns both RL stages from this demo, at its smallest
    from haina.tools.bench import rl

    result = json.loads((_bench(rl, workdir, tmp_path)).read_text())
    assert [(r["algorithm"], r["seed"]) for r in result["runs"]] == [("ppo", 0), ("grpo", 0)]
    assert result["sft"] == pytest.approx(policies["sft"])  # the demo's own evaluation of the SFT model
    assert all(r["peak_rss_gib"] >= r["rss_after_imports_gib"] > 0 and r["rollout_tokens_per_s"] > 0
               for r in result["runs"])


def _bench(rl: Any, workdir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "bench.json"
    assert rl.main(["--demo", str(workdir), "--seeds", "0", "--steps", "1", "--out", str(tmp_path / "bench"),
                    "--json", str(out), "--algorithms", "ppo", "grpo"]) == 0
    return out
