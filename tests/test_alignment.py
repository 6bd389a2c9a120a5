"""SFT, reward model, PPO and DPO end to end on the verifiable task: one process and tp=2 under torchrun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from haina.core.checkpoint import load_model_weights
from haina.core.config import load_config
from haina.core.errors import InputFileError
from haina.core.model import Transformer
from tests.alignment_helpers import AlignmentData, haina, records
from tests.cli_helpers import cli_here
from tests.conftest import install_plugin_package
from tests.parallel_helpers import run_many

# Every test trains through the CLI (pretrain -> sft -> rm, then torchrun with 2 processes).
pytestmark = pytest.mark.integration

SHORT = ("train.log_every=1", "train.save_every=100", "optim.warmup_steps=0")
LAYOUTS = {
    "tp2": ("parallel.tp=2", "parallel.sequence_parallel=false"),
    "zero3": ("parallel.dp_backend=deepspeed", "deepspeed.zero_stage=3"),
}


@pytest.fixture(scope="module")
def runs(alignment_runs: dict) -> dict:
    """The session's pretrain -> sft -> rm runs of the tiny preset (tests/conftest.py)."""
    return alignment_runs


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
    """The held-out report's accuracies are those of the saved model, recomputed here by scoring each
    pair's two sides through the tools' scorer (another code path) and counting by hand."""
    from haina.tools.align_data.pairs import scores_from_reward_model

    report = json.loads((runs["rm"] / "rm_eval.json").read_text())
    pairs = [json.loads(line) for line in runs["data"].eval_pairs.read_text().splitlines()]
    sides = [{"id": f"{p['id']}/{side}", "prompt": p["prompt"], "response": p[side]}
             for p in pairs for side in ("chosen", "rejected")]
    scores = scores_from_reward_model(sides, str(runs["rm"]))
    right = {p["id"]: scores[f"{p['id']}/chosen"] > scores[f"{p['id']}/rejected"] for p in pairs}
    assert report["pairs"] == len(pairs) == 40
    assert report["accuracy"] == pytest.approx(sum(right.values()) / 40)
    for gap, bucket in report["by_gap"].items():
        mine = [right[p["id"]] for p in pairs if str(p["gap"]) == gap]
        assert bucket["pairs"] == len(mine) and bucket["accuracy"] == pytest.approx(sum(mine) / len(mine)), gap
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


def test_critic_warmup_leaves_the_actor_untouched(runs: dict, capsys: pytest.CaptureFixture[str]) -> None:
    warm = runs["root"] / "ppo-warm"
    code, _, err = cli_here(capsys, "ppo", *_ppo_args(runs, warm, steps=2, warmup=2))
    assert code == 0, err
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
    code, _, err = cli_here(capsys, "ppo", *_ppo_args(runs, after, steps=2, warmup=1))
    assert code == 0, err
    _, trained_after = _actor_critic(after)
    load_model_weights(after, trained_after)
    assert not torch.equal(trained_after.actor.layers["0"].mlp.up_proj.weight, start.layers["0"].mlp.up_proj.weight)
    assert [r["actor_trains"] for r in records(after)] == [0.0, 1.0]


def _algorithm_args(algorithm: str, runs: dict, run_dir: Path) -> list[str]:
    data: AlignmentData = runs["data"]
    if algorithm == "grpo":
        data = runs["data"]
        return ["--from", str(runs["sft"]), f"align.data={data.prompts}", f"train.run_dir={run_dir}", "train.steps=2",
                "grpo.reward=[{type: verifier, function: 'tests.test_rl_algorithms:answer_reward'}]",
                "grpo.n_samples=2", "grpo.sampling.max_new_tokens=6", "optim.lr=1e-3", "optim.min_lr=1e-3",
                "train.global_batch_size=4"]
    if algorithm == "ppo":
        # no critic warm-up here: ZeRO-3 applies weight decay to the actor's flat partition while it gets no
        # gradient (a drift of ~2e-5 in KL), which FSDP2 does not; the warm-up has its own test
        return [*_ppo_args(runs, run_dir, steps=2, warmup=0), "train.global_batch_size=4"]
    return {
        "sft": ["--from", str(runs["pt"]), f"align.data={data.sft}", "train.steps=2"],
        "rm": ["--from", str(runs["sft"]), f"align.data={data.pairs}", "train.steps=2"],
        "dpo": ["--from", str(runs["sft"]), f"align.data={data.pairs}", "train.steps=2", "optim.min_lr=1e-4",
                "optim.lr=1e-4"],
    }[algorithm] + [f"train.run_dir={run_dir}", "train.global_batch_size=4"]  # the same batch on every layout


ALGORITHMS = ["sft", "rm", "ppo", "dpo", "grpo"]


def _spec(algorithm: str, runs: dict, run_dir: Path, *extra: str) -> dict:
    """A :mod:`tests.multi_train` run: ``haina <algorithm> --from ... <overrides>``."""
    args = _algorithm_args(algorithm, runs, run_dir)
    source = args[args.index("--from") + 1]
    overrides = [a for i, a in enumerate(args) if a != "--from" and (i == 0 or args[i - 1] != "--from")]
    return {"name": f"{run_dir.name}", "algorithm": algorithm, "from": source, "overrides": [*overrides, *SHORT, *extra]}


@pytest.fixture(scope="module")
def layout_runs(runs: dict) -> dict[tuple[str, str], list[dict]]:
    """Each algorithm's two steps in one process (what every layout must reproduce) and under each layout,
    made on first use: every algorithm of one layout in one launch (:func:`run_many`)."""
    out: dict[tuple[str, str], list[dict]] = {}
    for layout, nproc, extra in (("single", 1, ()), *((name, 2, LAYOUTS[name]) for name in LAYOUTS)):
        logged = run_many([_spec(a, runs, runs["root"] / f"{layout}-{a}", *extra) for a in ALGORITHMS], nproc)
        out.update({(layout, a): logged[f"{layout}-{a}"] for a in ALGORITHMS})
    return out


# The metric each algorithm's layouts must reproduce, and how closely: PPO's rollouts are seeded alike on
# every layout, so its reward, KL and loss repeat the single process's to float rounding too.
COMPARED = {"sft": ("loss", "lm_loss"), "rm": ("loss", "accuracy"), "dpo": ("loss", "reward_margin"),
            "ppo": ("loss", "reward", "kl"), "grpo": ("loss", "reward", "kl")}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_algorithm_runs_on_two_processes(algorithm: str, layout: str, runs: dict, layout_runs: dict) -> None:
    """Each algorithm under tensor parallelism (fsdp2 backend) and on DeepSpeed ZeRO-3 gives the one-process
    run's losses and metrics within 1e-4, step by step."""
    logged = layout_runs[layout, algorithm]
    assert [r["step"] for r in logged] == [1, 2]
    saved = load_config(str(runs["root"] / f"{layout}-{algorithm}" / "config.yaml"))  # it ran as that layout
    assert (saved.parallel.tp, saved.parallel.dp_backend) == ((2, "fsdp2") if layout == "tp2" else (1, "deepspeed"))
    expected = {
        "sft": {"lm_loss", "max_z_loss"},
        "rm": {"accuracy", "reward_margin"},
        "dpo": {"chosen_reward", "rejected_reward", "reward_margin", "accuracy"},
        "ppo": {"reward", "kl", "entropy", "clip_fraction", "value_loss", "response_length", "kl_coef",
                "rollout_tokens_per_s", "train_tokens_per_s"},
        "grpo": {"reward", "reward_std", "kl", "kl_loss", "entropy", "flat_groups"},
    }[algorithm]
    assert expected <= set(logged[-1])
    reference = layout_runs["single", algorithm]
    for key in COMPARED[algorithm]:
        for ours, theirs in zip(logged, reference, strict=True):
            assert abs(ours[key] - theirs[key]) <= 1e-4 * max(1.0, abs(theirs[key])), (key, ours["step"], ours[key], theirs[key])


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
