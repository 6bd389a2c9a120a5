"""Config loading, overrides, presets and the one-line errors (exit status 2) for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from haina.core.config import ConfigError, load_config, preset_names
from haina.tools.cli import run


def test_presets_ship_and_load() -> None:
    assert {"baichuan2-7b", "baichuan2-13b", "tiny", "demo"} <= set(preset_names())
    seven = load_config("baichuan2-7b")
    thirteen = load_config("baichuan2-13b")
    assert (seven.model.position, seven.model.ffn_size, seven.optim.lr) == ("rope", 11008, 2e-4)
    assert (thirteen.model.position, thirteen.model.ffn_size, thirteen.optim.lr) == ("alibi", 13696, 1.5e-4)
    assert seven.loss.terms == {"cross_entropy": 1.0, "max_z": 2e-4}
    assert (seven.optim.beta1, seven.optim.beta2, seven.optim.weight_decay, seven.optim.clip_grad) == (
        0.9, 0.95, 0.1, 0.5,
    )


def test_dotted_overrides_are_typed() -> None:
    cfg = load_config("tiny", ["model.position=alibi", "optim.lr=1e-3", "train.precision=bf16", "data.prefixes=[a, b]"])
    assert cfg.model.position == "alibi"
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.train.precision == "bf16"
    assert cfg.data.prefixes == ["a", "b"]


def test_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  hidden_size: 96\n  num_heads: 3\n  num_layers: 1\ntrain:\n  seq_len: 32\n")
    cfg = load_config(str(path))
    assert (cfg.model.hidden_size, cfg.model.head_dim, cfg.model.ffn_size) == (96, 32, 256)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.hiden_size=5"], "model.hiden_size: unknown key; allowed: "),
        (["bogus.x=1"], "bogus: unknown key; allowed: "),
        (["model.num_layers=many"], "model.num_layers: "),
        (["model.num_heads=7"], "model: num_heads 7 must divide hidden_size 64"),
        (["model.position=xpos"], "model.position: unknown position plugin 'xpos'; registered: alibi"),
        (["loss.terms={focal: 1.0}"], "loss.terms: unknown loss plugin 'focal'"),
        (["train.precision=fp8"], "train.precision: "),
        (["optim.min_lr=1.0"], "optim: min_lr 1.0 must not exceed lr"),
        (["train.seq_len=4096"], "exceeds model.max_seq_len"),
        (["nodot"], "expected key.path=value"),
    ],
)
def test_bad_config_is_one_line(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("tiny", overrides)
    message = str(info.value)
    assert "\n" not in message
    assert expected in message
    if "unknown key" in expected:
        assert "allowed: " in message and len(message.split("allowed: ")[1]) > 0


def test_unknown_key_lists_allowed_fields() -> None:
    with pytest.raises(ConfigError, match=r"allowed: .*hidden_size.*num_heads"):
        load_config("tiny", ["model.hiden_size=5"])


def test_missing_config_names_presets() -> None:
    with pytest.raises(ConfigError, match="presets: .*baichuan2-7b"):
        load_config("no-such-preset")


def test_cli_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["pretrain", "--config", "tiny", "model.num_heads=5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("haina pretrain: error: model: num_heads 5 must divide hidden_size 64")


def test_cli_exits_2_for_missing_data(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = run(["pretrain", "--config", "tiny", f"train.run_dir={tmp_path}", f"data.prefixes=[{tmp_path}/nothing]"])
    assert code == 2
    assert "nothing.bin does not exist" in capsys.readouterr().err


def test_console_script_runs_as_a_process() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "haina.tools.cli", "pretrain", "--config", "tiny", "model.head=tied"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "model.head: unknown head plugin 'tied'; registered: linear, normhead" in proc.stderr


def test_a_config_of_the_previous_release_migrates_into_plugin_sections() -> None:
    """config.yaml written before plugins owned their settings: align.ppo/sampling/reward_model go to ppo:,
    a non-default align.beta to dpo:, defaults of other algorithms are dropped, shared keys stay in align."""
    from haina.core.config import build_config

    old = {
        "algorithm": "ppo",
        "align": {
            "init_from": "runs/sft", "reward_model": "runs/rm", "data": "p.jsonl", "beta": 0.3, "margin": False,
            "gate_sample": 5, "sampling": {"top_k": 7}, "ppo": {"clip": 0.15, "critic_warmup_steps": 3},
        },
    }
    cfg = build_config(old)
    assert (cfg.ppo.clip, cfg.ppo.critic_warmup_steps, cfg.ppo.sampling.top_k) == (0.15, 3, 7)
    assert cfg.ppo.reward_model == "runs/rm" and cfg.align.init_from == "runs/sft"
    assert cfg.dpo.beta == 0.3
    assert "rm" not in cfg.model_extra and "sft" not in cfg.model_extra  # only defaults there: dropped
    with pytest.raises(ConfigError, match=r"^align\.frobnicate: unknown key; allowed: data, eval_data, init_from, tokenizer$"):
        build_config({"align": {"frobnicate": 1}})
