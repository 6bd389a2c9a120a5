"""SFT, reward model, PPO and DPO end to end on the verifiable task: one process and tp=2 under torchrun."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from haina.core.checkpoint import load_model_weights
from haina.core.config import load_config
from haina.core.errors import InputFileError
from haina.core.model import Transformer
from tests.alignment_helpers import AlignmentData, haina, make_alignment_data, records
from tests.conftest import install_plugin_package

# Every test trains through the CLI (pretrain -> sft -> rm, then torchrun with 2 processes).
pytestmark = pytest.mark.integration

SHORT = ("train.log_every=1", "train.save_every=100", "optim.warmup_steps=0")
LAYOUTS = {
    "tp2": ("parallel.tp=2", "parallel.sequence_parallel=false"),
    "zero3": ("parallel.dp_backend=deepspeed", "deepspeed.zero_stage=3"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tokenizer, task data, and pretrain -> sft -> rm runs of the tiny preset (one process)."""
    root = tmp_path_factory.mktemp("align")
    data = make_alignment_data(root / "data")
    pt = root / "pt"
    haina("pretrain", "--config", "tiny", f"train.run_dir={pt}", f"data.prefixes=[{data.pretrain_prefix}]",
          f"data.tokenizer={data.tokenizer}", "train.steps=6", *SHORT)
    haina("sft", "--from", str(pt), f"align.data={data.sft}", "train.steps=4", *SHORT)
    haina("rm", "--from", str(root / "pt-sft"), f"align.data={data.pairs}", f"align.eval_data={data.eval_pairs}",
          "train.steps=4", *SHORT)
    return {"data": data, "pt": pt, "sft": root / "pt-sft", "rm": root / "pt-sft-rm", "root": root}


def _ppo_args(runs: dict, run_dir: Path, steps: int, warmup: int) -> list[str]:
    data: AlignmentData = runs["data"]
    return ["--from", str(runs["sft"]), f"ppo.reward_model={runs['rm']}", f"align.data={data.prompts}",
            f"train.run_dir={run_dir}", f"train.steps={steps}", f"ppo.critic_warmup_steps={warmup}",
            "ppo.sampling.max_new_tokens=6", "optim.lr=1e-3", "optim.min_lr=1e-3", *SHORT]


def test_reward_model_run_loads_for_scoring(runs: dict) -> None:
    """Tools (pairs, the demo, the safety judge) load a reward-model run with its value head and score."""
    from haina.core.model_loading import load_model
    from haina.core.tokenizer import load_tokenizer
    from haina.plugins.algorithms.reward_model import last_token_scores
    from haina.plugins.model.head import ValueHead
    from haina.tools.align_data.pairs import scores_from_reward_model

    cfg, model = load_model(runs["rm"], value_head=True)
    assert isinstance(model.head, ValueHead)
    tokens = torch.tensor([load_tokenizer(cfg).encode("1 + 1 = 2")])
    assert torch.isfinite(last_token_scores(model, tokens, torch.tensor([tokens.shape[1] - 1]))).all()
    records = [{"id": "a", "prompt": [{"role": "user", "content": "1 + 1 ="}], "response": "2"}]
    assert set(scores_from_reward_model(records, str(runs["rm"]))) == {"a"}
    with pytest.raises(InputFileError, match="not a reward model run"):
        scores_from_reward_model(records, str(runs["sft"]))


def test_reward_model_reports_accuracy_by_gap_and_category(runs: dict) -> None:
    report = json.loads((runs["rm"] / "rm_eval.json").read_text())
    assert report["pairs"] == 40 and 0.0 <= report["accuracy"] <= 1.0
    assert set(report["by_gap"]) <= {"1", "2", "3", "4", "5"} and len(report["by_gap"]) >= 4
    assert sum(b["pairs"] for b in report["by_gap"].values()) == 40
    assert set(report["by_category_level1"]) == {"math", "text"}
    coverage = report["coverage"]
    assert coverage["prompts"] == 200 and "knowledge" in coverage["uncovered"][0]
    assert [r["step"] for r in records(runs["rm"])] == [1, 2, 3, 4]


def _actor_critic(cfg_run: Path):
    from haina.plugins.algorithms.ppo import ActorCritic

    cfg = load_config(str(cfg_run / "config.yaml"))
    return cfg, ActorCritic(cfg)


def test_critic_warmup_leaves_the_actor_untouched(runs: dict) -> None:
    warm = runs["root"] / "ppo-warm"
    haina("ppo", *_ppo_args(runs, warm, steps=2, warmup=2))
    cfg, trained = _actor_critic(warm)
    load_model_weights(warm, trained)
    start = Transformer(cfg.model)
    load_model_weights(runs["sft"], start)
    for (name, p), q in zip(trained.actor.state_dict().items(), start.state_dict().values(), strict=True):
        assert torch.equal(p, q), f"actor {name} moved during the critic warm-up"
    rm = Transformer(cfg.model.model_copy(update={"head": "value"}))
    load_model_weights(runs["rm"], rm)
    moved = [n for (n, p), q in zip(trained.critic.state_dict().items(), rm.state_dict().values(), strict=True)
             if not torch.equal(p, q)]
    assert moved, "the critic did not train during the warm-up"
    logged = records(warm)
    assert [r["actor_trains"] for r in logged] == [0.0, 0.0]

    after = runs["root"] / "ppo-after"
    haina("ppo", *_ppo_args(runs, after, steps=2, warmup=1))
    _, trained_after = _actor_critic(after)
    load_model_weights(after, trained_after)
    assert not torch.equal(trained_after.actor.layers["0"].mlp.up_proj.weight, start.layers["0"].mlp.up_proj.weight)
    assert [r["actor_trains"] for r in records(after)] == [0.0, 1.0]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("algorithm", ["sft", "rm", "ppo", "dpo"])
def test_algorithm_runs_on_two_processes(algorithm: str, layout: str, runs: dict) -> None:
    """Each algorithm under tensor parallelism (fsdp2 backend) and on DeepSpeed ZeRO-3."""
    data: AlignmentData = runs["data"]
    run_dir = runs["root"] / f"{layout}-{algorithm}"
    args = {
        "sft": ["--from", str(runs["pt"]), f"align.data={data.sft}", "train.steps=2"],
        "rm": ["--from", str(runs["sft"]), f"align.data={data.pairs}", "train.steps=2"],
        "dpo": ["--from", str(runs["sft"]), f"align.data={data.pairs}", "train.steps=2", "optim.min_lr=1e-4",
                "optim.lr=1e-4"],
    }.get(algorithm)
    if algorithm == "ppo":
        args = _ppo_args(runs, run_dir, steps=2, warmup=1)
    haina(algorithm, *args, f"train.run_dir={run_dir}", *LAYOUTS[layout], *SHORT, nproc=2)
    logged = records(run_dir)
    assert [r["step"] for r in logged] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in logged)
    expected = {
        "sft": {"lm_loss", "max_z_loss"},
        "rm": {"accuracy", "reward_margin"},
        "dpo": {"chosen_reward", "rejected_reward", "reward_margin", "accuracy"},
        "ppo": {"reward", "kl", "entropy", "clip_fraction", "value_loss", "response_length", "kl_coef",
                "rollout_tokens_per_s", "train_tokens_per_s"},
    }[algorithm]
    assert expected <= set(logged[-1])


def test_alignment_layout_errors_are_one_line(runs: dict, tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "haina.tools.cli", "dpo", "--nproc-per-node", "2", "--from", str(runs["sft"]), "parallel.pp=2",
         f"train.run_dir={tmp_path}"], capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "runs without pipeline parallelism" in proc.stderr and proc.stderr.strip().count("\n") == 0


THIRD_PARTY_ALGORITHM = '''
from haina.plugins.algorithms.pretrain import Pretrain
from haina.core.registry import register
from haina.core.loss import LossOutput


@register("algorithm", "acme_scaled")
class Scaled(Pretrain):
    """Pretraining with the loss halved, and a metric of its own."""

    metrics = ("unscaled",)

    def loss(self, model, batch):
        out = super().loss(model, batch)
        return LossOutput(out.loss * 0.5, {"unscaled": out.loss.detach()})
'''


def test_third_party_algorithm_plugin_runs(tmp_path: Path, tiny_data: Path) -> None:
    site = install_plugin_package(tmp_path / "site", "acme_algorithms", THIRD_PARTY_ALGORITHM)
    run_dir = tmp_path / "run"
    haina("pretrain", "--config", "tiny", "algorithm=acme_scaled", "train.steps=2", f"train.run_dir={run_dir}",
          f"data.prefixes=[{tiny_data}]", *SHORT, env_extra={"PYTHONPATH": str(site)})
    logged = records(run_dir)
    assert [r["step"] for r in logged] == [1, 2]
    for r in logged:
        assert r["loss"] == pytest.approx(0.5 * r["unscaled"], rel=1e-6)
