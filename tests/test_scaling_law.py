"""Scaling laws: the fit recovers known parameters, reports usable uncertainties and predictions, the
sweep trains a ladder for its budgets, and bad input fails in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from haina.core.config import load_config
from haina.tools.scaling_law import LADDERS, fit_command, fit_power_law, matmul_params, sweep
from tests.conftest import one_line_error

TRUE = {"a": 310.0, "b": -0.12, "l_inf": 1.7}


def _law(c: np.ndarray) -> np.ndarray:
    return TRUE["a"] * c ** TRUE["b"] + TRUE["l_inf"]


@pytest.mark.parametrize("noise", [0.0, 3e-4])
def test_fit_recovers_parameters(noise: float) -> None:
    c = np.geomspace(1e15, 1e20, 8)
    y = _law(c) * (1 + noise * np.random.default_rng(0).standard_normal(len(c)))
    fit = fit_power_law(c.tolist(), y.tolist())
    assert fit.a == pytest.approx(TRUE["a"], rel=0.02)
    assert fit.b == pytest.approx(TRUE["b"], rel=0.02)
    assert fit.l_inf == pytest.approx(TRUE["l_inf"], rel=0.02)
    predicted, err = fit.predict(1e22)  # two decades beyond the data
    assert predicted == pytest.approx(_law(np.array(1e22)), rel=0.01)
    if noise:
        assert 0 < fit.b_err < 0.05 and 0 < fit.l_inf_err < 0.5 and 0 < err < 0.1
        assert abs(fit.l_inf - TRUE["l_inf"]) < 4 * fit.l_inf_err + 1e-9


def test_fit_rejects_bad_points() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        fit_power_law([1e10, 1e11], [3.0, 2.5])
    with pytest.raises(ValueError, match="finite and positive"):
        fit_power_law([1e10, 1e11, -1e12], [3.0, 2.5, 2.2])
    with pytest.raises(ValueError, match="3 distinct"):
        fit_power_law([1e10, 1e10, 1e11], [3.0, 2.9, 2.5])


def test_fit_command_holds_out_and_plots(tmp_path: Path) -> None:
    c = np.geomspace(1e12, 1e16, 6)
    points = [{"name": f"r{i}", "flops": float(x), "loss": float(y)} for i, (x, y) in enumerate(zip(c, _law(c), strict=True))]
    (tmp_path / "sweep.json").write_text(json.dumps({"points": points}))
    text = fit_command(tmp_path / "sweep.json", tmp_path / "fit", holdout_largest=True, target_params=7e9,
                       target_tokens=2.6e12)
    report = json.loads((tmp_path / "fit.json").read_text())
    assert len(report["points"]) == 5 and report["holdout"]["name"] == "r5"
    assert report["holdout"]["predicted"] == pytest.approx(points[-1]["loss"], rel=1e-3)
    assert report["target"]["flops"] == pytest.approx(6 * 7e9 * 2.6e12)
    assert (tmp_path / "fit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "held out r5" in text


def test_fit_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text('{"runs": []}')
    (tmp_path / "two.json").write_text(json.dumps({"points": [{"flops": 1e10, "loss": 3}, {"flops": 1e11, "loss": 2}]}))
    assert "no such file" in one_line_error(fit_command, tmp_path / "missing.json")
    assert "not a sweep.json" in one_line_error(fit_command, tmp_path / "bad.json")
    assert "at least 3" in one_line_error(fit_command, tmp_path / "two.json")
    assert "go together" in one_line_error(fit_command, tmp_path / "two.json", target_params=1e9)


def test_ladders_have_the_reports_shapes() -> None:
    shapes = [(r["hidden_size"], r["ffn_hidden_size"], r["num_layers"], r["num_heads"]) for r in LADDERS["baichuan2"]["rungs"]]
    assert len(shapes) == 7 and shapes[0] == (384, 1152, 6, 6) and shapes[-1] == (2880, 8640, 28, 20)
    assert all(h % heads == 0 for h, _, _, heads in shapes)
    assert len(LADDERS["cpu"]["rungs"]) >= 4
    sizes = [matmul_params(load_config("tiny", [f"model.{k}={v}" for k, v in r.items() if k not in ("name", "flops")]).model)
             for r in LADDERS["cpu"]["rungs"]]
    assert sizes == sorted(sizes)


def test_sweep_trains_each_rung_for_its_budget(tmp_path: Path, tiny_data: Path) -> None:
    """A three-rung ladder on the tiny preset: steps = budget / (6 N tokens_per_step), points recorded."""
    tokens_per_step = 2 * 64  # tiny: micro_batch_size 2, seq_len 64
    rungs = [{"name": n, "hidden_size": h, "ffn_hidden_size": 2 * h, "num_layers": 1, "num_heads": 2} for n, h in
             (("a", 16), ("b", 32), ("c", 48))]
    for rung, steps in zip(rungs, (3, 4, 5), strict=True):
        cfg = load_config("tiny", [f"model.{k}={v}" for k, v in rung.items() if k != "name"])
        rung["flops"] = 6 * matmul_params(cfg.model) * tokens_per_step * steps
    ladder = tmp_path / "ladder.yaml"
    ladder.write_text(yaml.safe_dump({"base": "tiny", "overrides": ["train.log_every=1"], "rungs": rungs}))
    result = sweep(str(ladder), tmp_path / "sweep", overrides=[f"data.prefixes=[{tiny_data}]"], eval_data=str(tiny_data))
    points = result["points"]
    assert [p["steps"] for p in points] == [3, 4, 5]
    assert [p["flops"] for p in points] == pytest.approx([r["flops"] for r in rungs])
    assert all(np.isfinite(p["loss"]) and p["loss"] == p["eval_loss"] for p in points)
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["points"] == points
    assert (tmp_path / "sweep" / "runs" / "c" / "checkpoints" / "step_5").is_dir()
    assert "not a built-in ladder" in one_line_error(sweep, str(tmp_path / "nope.yaml"), tmp_path / "x")
    assert "--budget-scale" in one_line_error(sweep, "cpu", tmp_path / "x", budget_scale=0)
