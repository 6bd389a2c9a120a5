"""Two third-party plugin packages with settings of their own, installed as their own distributions:
an algorithm (a REINFORCE-style variant of next-token training) and a position encoding with a parameter.
They run through `haina` with their settings from a YAML file and from dotted overrides, are listed by
`haina plugins`, are refused in one line when a setting is wrong, and their settings come back from the
run's config.yaml on resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from tests.cli_helpers import run_cli_batch
from tests.conftest import install_plugin_package

pytestmark = pytest.mark.integration

ALGORITHM = '''
"""REINFORCE on next-token prediction: sample tokens from the policy, reward a sample that hits the
data's next token, subtract a baseline, push up the log-probability of rewarded samples; entropy bonus."""
from typing import Literal

import torch

from haina.core.api import Algorithm, Field, LossOutput, PluginSettings, PretrainBatches, register


class ReinforceSettings(PluginSettings):
    samples: int = Field(2, gt=0, description="Tokens sampled per position.")
    baseline: Literal["mean", "none"] = Field("mean", description="Reward baseline subtracted.")
    reward: float = Field(1.0, gt=0, description="Reward of a sample equal to the next token.")
    entropy_coef: float = Field(0.01, ge=0, description="Weight of the entropy bonus.")


@register("algorithm", "reinforce", settings=ReinforceSettings)
class Reinforce(Algorithm):
    metrics = ("reward",)

    def batches(self, cfg, run_dir, num_samples):
        return PretrainBatches(
            cfg.data, seq_len=cfg.train.seq_len, micro_batch_size=cfg.train.micro_batch_size,
            num_samples=num_samples, seed=cfg.train.seed, eod=2, vocab_size=cfg.model.vocab_size,
            cache_dir=run_dir / "data_cache",
        )

    def loss(self, model, batch):
        tokens, labels = (t.to(next(model.parameters()).device) for t in batch)
        logp = model.logits(model(tokens)).float().log_softmax(-1)  # [b, s, V]
        s = self.settings
        sample = torch.distributions.Categorical(logits=logp.detach()).sample((s.samples,))  # [n, b, s]
        reward = (sample == labels).float() * s.reward
        baseline = reward.mean() if s.baseline == "mean" else 0.0
        chosen = logp.unsqueeze(0).expand(s.samples, *logp.shape).gather(-1, sample[..., None])[..., 0]
        entropy = -(logp.exp() * logp).sum(-1).mean()
        loss = -((reward - baseline) * chosen).mean() - s.entropy_coef * entropy
        return LossOutput(loss, {"reward": reward.mean().detach()})
'''

POSITION = '''
"""Sinusoidal absolute positions added to q and k, scaled by a setting."""
import math

import torch
from torch import nn

from haina.core.api import Field, PluginSettings, register


class ScaledSinusoidalSettings(PluginSettings):
    scale: float = Field(1.0, gt=0, description="Amplitude of the added position signal.")
    base: float = Field(10000.0, gt=1, description="Frequency base.")


@register("position", "scaled_sinusoidal", settings=ScaledSinusoidalSettings)
class ScaledSinusoidal(nn.Module):
    def __init__(self, cfg, settings):
        super().__init__()
        self.head_dim, self.max_seq_len, self.settings = cfg.head_dim, cfg.max_seq_len, settings
        self.register_buffer("table", torch.empty(cfg.max_seq_len, cfg.head_dim), persistent=False)
        self.reset_parameters()

    def reset_parameters(self):  # the model is built on the meta device: the table is filled here
        d = self.head_dim
        pos = torch.arange(self.max_seq_len, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(self.settings.base) / d))
        table = torch.zeros(self.max_seq_len, d)
        table[:, 0::2] = torch.sin(pos * freq)
        table[:, 1::2] = torch.cos(pos * freq)
        with torch.no_grad():
            self.table.copy_((table * self.settings.scale).to(self.table.device))

    def forward(self, q, k, positions):
        add = self.table[positions].to(q.dtype)
        return q + add, k + add

    def bias(self, q_positions, k_positions):
        return None
'''


WRONG_SETTINGS = [
    ("reinforce.baseline=median", "reinforce.baseline: Input should be 'mean' or 'none'"),
    ("reinforce.sample=3", "reinforce.sample: unknown setting; allowed: baseline, entropy_coef, reward, samples"),
    ("model.scaled_sinusoidal.scale=-1", "model.scaled_sinusoidal.scale: Input should be greater than 0"),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> dict:
    """Both packages installed in a fresh site folder, then every `haina` command of the tests below in one
    new interpreter that finds them through their entry points (``run_cli_batch``): `plugins`, two training
    runs with the settings from YAML and one with a dotted override, a resume from the run's own
    config.yaml, and the wrong settings."""
    root = tmp_path_factory.mktemp("third_party")
    site = root / "site"
    install_plugin_package(site, "acme_rl", ALGORITHM)
    install_plugin_package(site, "acme_pos", POSITION)
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump({
        "algorithm": "reinforce",
        "reinforce": {"samples": 3, "baseline": "none"},
        "model": {"position": "scaled_sinusoidal", "scaled_sinusoidal": {"scale": 0.5}},
    }))
    common = ["--config", str(config), "train.steps=2", "train.log_every=1", "train.progress=false",
              "train.precision=fp32", "optim.warmup_steps=0", f"data.prefixes=[{tiny_data}]",
              "model.num_layers=1", "model.hidden_size=32", "model.num_heads=2", "model.vocab_size=512",
              "model.max_seq_len=64", "train.seq_len=32"]
    first, second = root / "a", root / "b"
    commands = {
        "plugins": ["plugins"],
        "first": ["pretrain", *common, f"train.run_dir={first}"],
        "second": ["pretrain", *common, f"train.run_dir={second}", "model.scaled_sinusoidal.scale=4"],
        "resumed": ["pretrain", "--config", str(first / "config.yaml"), "train.steps=3"],
        **{f"wrong {override}": ["pretrain", "--config", "tiny", "algorithm=reinforce",
                                 "model.position=scaled_sinusoidal", override] for override, _ in WRONG_SETTINGS},
    }
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    return {"dirs": {"first": first, "second": second}, **run_cli_batch(commands, env=env, cwd=root, timeout=600)}


def _records(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "event" not in r]


def test_plugins_lists_both_with_package_and_settings(runs: dict) -> None:
    out = runs["plugins"]
    assert out["rc"] == 0, out["stderr"]
    lines = out["stdout"].splitlines()
    reinforce = next(line for line in lines if line.strip().startswith("reinforce "))
    assert "(acme-rl)" in reinforce and "settings: reinforce" in reinforce
    position = next(line for line in lines if line.strip().startswith("scaled_sinusoidal "))
    assert "(acme-pos)" in position and "settings: model.scaled_sinusoidal" in position
    assert any("baseline (" in line and "default 'mean'" in line and "baseline subtracted" in line for line in lines)
    assert any("scale (float, default 1.0)" in line for line in lines)


def test_settings_from_yaml_and_overrides_reach_the_plugins(runs: dict) -> None:
    first, second = runs["dirs"]["first"], runs["dirs"]["second"]
    for name in ("first", "second", "resumed"):
        assert runs[name]["rc"] == 0, (name, runs[name]["stderr"][-3000:])
    saved = yaml.safe_load((first / "config.yaml").read_text())  # as the resume wrote it back: train.steps=3
    assert saved["reinforce"] == {"samples": 3, "baseline": "none", "reward": 1.0, "entropy_coef": 0.01}
    assert saved["model"]["scaled_sinusoidal"] == {"scale": 0.5, "base": 10000.0}
    records = _records(first)
    # two steps, then the resume from the run's own config.yaml continued at step 3 with the settings back
    assert [r["step"] for r in records] == [1, 2, 3] and all(0.0 <= r["reward"] <= 1.0 for r in records)
    assert saved["train"]["steps"] == 3

    # a dotted override changes the position plugin's parameter: the same seed, data and init give another loss
    assert yaml.safe_load((second / "config.yaml").read_text())["model"]["scaled_sinusoidal"]["scale"] == 4.0
    assert _records(second)[0]["loss"] != records[0]["loss"]


@pytest.mark.parametrize(("override", "expected"), WRONG_SETTINGS)
def test_a_wrong_setting_fails_in_one_line(runs: dict, override: str, expected: str) -> None:
    out = runs[f"wrong {override}"]
    assert out["rc"] == 2, out["stderr"]
    assert len(out["stderr"].strip().splitlines()) == 1, out["stderr"]
    assert expected in out["stderr"]
