"""The plugin registry, `haina plugins`, and a third-party plugin installed as its own distribution."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from haina.core import registry
from tests.cli_helpers import run_cli_batch
from tests.conftest import install_plugin_package

BUILTINS = {
    "position": {"rope", "alibi"},
    "attention": {"sdpa"},
    "norm": {"rmsnorm"},
    "mlp": {"swiglu"},
    "head": {"normhead", "linear"},
    "loss": {"cross_entropy", "max_z", "z_loss"},
    "algorithm": {"pretrain"},
}


def test_builtins_registered_by_kind() -> None:
    for kind, expected in BUILTINS.items():
        assert expected <= set(registry.names(kind)), kind
    assert {e.package for e in registry.entries() if e.name in {"rope", "pretrain"}} == {"haina"}


def test_unknown_plugin_lists_names() -> None:
    with pytest.raises(registry.PluginError, match="unknown norm plugin 'layernorm'; registered: apex, rmsnorm"):
        registry.get("norm", "layernorm")
    with pytest.raises(registry.PluginError, match="unknown plugin kind"):
        registry.register("optimizer_kind_that_does_not_exist", "x")


def test_clash_between_packages_is_refused() -> None:
    class Other:
        pass

    token = registry._current_package.set("someone-else")
    try:
        with pytest.raises(registry.PluginError, match="clashes with the one from haina"):
            registry.register("norm", "rmsnorm")(Other)
    finally:
        registry._current_package.reset(token)


THIRD_PARTY_MODULE = '''
"""A position encoding haina has never heard of: fixed sinusoidal absolute positions added to q and k."""
import math
import os
import torch
from torch import nn
from haina.core.registry import register


@register("position", "sinusoidal_qk")
class SinusoidalQK(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.head_dim, self.max_seq_len = cfg.head_dim, cfg.max_seq_len
        self.register_buffer("table", torch.empty(cfg.max_seq_len, cfg.head_dim), persistent=False)
        self.reset_parameters()

    def reset_parameters(self):  # the model is built on the meta device: the table is filled here
        d = self.head_dim
        pos = torch.arange(self.max_seq_len, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
        table = torch.zeros(self.max_seq_len, d)
        table[:, 0::2] = torch.sin(pos * freq)
        table[:, 1::2] = torch.cos(pos * freq)
        with torch.no_grad():
            self.table.copy_(table.to(self.table.device))

    def forward(self, q, k, positions):
        trace = os.environ.get("ACME_TRACE")
        if trace:  # the test's proof that this code, not a built-in, ran
            with open(trace, "a") as f:
                f.write(f"{tuple(q.shape)} {int(positions.max())}\\n")
        add = self.table[positions].to(q.dtype)
        return q + add, k + add

    def bias(self, q_positions, k_positions):
        return None
'''


def _haina(args: list[str], site: Path, cwd: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(site), **extra)
    return subprocess.run(
        [sys.executable, "-m", "haina.tools.cli", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=240
    )


@pytest.mark.integration
def test_third_party_position_plugin_trains(tmp_path: Path, tiny_data: Path) -> None:
    site = tmp_path / "site"
    install_plugin_package(site, "acme_positions", THIRD_PARTY_MODULE)

    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(site), ACME_TRACE=str(tmp_path / "trace.txt"))
    done = run_cli_batch({
        "plugins": ["plugins"],
        "pretrain": ["pretrain", "--config", "tiny", "model.position=sinusoidal_qk", "train.steps=3",
                     f"train.run_dir={run_dir}", f"data.prefixes=[{tiny_data}]"],
    }, env=env, cwd=tmp_path, timeout=240)
    listing, trained = done["plugins"], done["pretrain"]
    assert listing["rc"] == 0, listing["stderr"]
    assert "sinusoidal_qk" in listing["stdout"] and "(acme-positions)" in listing["stdout"]
    assert "rope" in listing["stdout"] and "(haina)" in listing["stdout"]
    assert trained["rc"] == 0, trained["stderr"]
    # the plugin's own forward ran in every block of every micro-batch: 3 steps x 1 micro-batch x 2 layers,
    # on [batch 2, heads 4, seq 64, head_dim 16] with positions up to 63
    calls = (tmp_path / "trace.txt").read_text().splitlines()
    assert calls == ["(2, 4, 64, 16) 63"] * 6, calls[:4]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in records)  # finite, positive

    # Without the third-party distribution on the path the same name is a config error, exit 2.
    missing = _haina(["pretrain", "--config", "tiny", "model.position=sinusoidal_qk"], tmp_path / "empty", tmp_path)
    assert missing.returncode == 2
    assert "unknown position plugin 'sinusoidal_qk'" in missing.stderr


def test_an_incomplete_algorithm_is_refused_in_one_line() -> None:
    """The contract is checked when the config names the plugin, not deep inside the first step."""
    from haina.core.algorithm import Algorithm, check_algorithm
    from haina.core.config import load_config

    @registry.register("algorithm", "test_no_loss")
    class NoLoss(Algorithm):
        def batches(self, cfg, run_dir, num_samples):
            return None

    @registry.register("algorithm", "test_no_batches")
    class NoBatches(Algorithm):
        def loss(self, model, batch):
            return None

    @registry.register("algorithm", "test_not_an_algorithm")
    class Plain:
        pass

    for name, expected in (
        ("test_no_loss", "must implement loss() or train_step()"),
        ("test_no_batches", "must implement batches"),
        ("test_not_an_algorithm", "must be a subclass of haina.core.algorithm.Algorithm"),
    ):
        with pytest.raises(registry.PluginError, match=re.escape(expected)):
            check_algorithm(load_config("tiny", [f"algorithm={name}"]))
