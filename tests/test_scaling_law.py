"""Scaling laws: the fit recovers known parameters, reports usable uncertainties and predictions, the
sweep trains a ladder for its budgets, and bad input fails in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
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


def _matmul_params_by_hand(model: torch.nn.Module) -> int:
    """N of C = 6ND as the module's docstring defines it (every block's attention and MLP matrices plus
    the output head; the embedding is a lookup), counted from the built model's parameter shapes."""
    return sum(p.numel() for name, p in model.named_parameters()
               if p.ndim == 2 and (name.startswith("layers.") or name.startswith("head.")))


def test_sweep_trains_each_rung_for_its_budget(tmp_path: Path, tiny_data: Path) -> None:
    """A three-rung ladder on the tiny preset: steps = round(budget / (6 N tokens_per_step)) with N and the
    steps worked out here; the loss is the held-out loss of the saved model on the eval data."""
    from haina.core.metrics import read_metrics
    from haina.core.model import Transformer
    from haina.core.model_loading import load_model
    from tests.conftest import write_indexed

    tokens_per_step = 2 * 64  # tiny: micro_batch_size 2, seq_len 64, one process
    shapes = {"a": 16, "b": 32, "c": 48}  # hidden; ffn 2 * hidden, 1 layer, 2 heads, vocab 512
    # N = layers * (4 h^2 + 3 h * ffn) + vocab * h = 10 h^2 + 512 h: 10752, 26624, 47616; one step is
    # 6 * N * 128 FLOPs = 8257536, 20447232, 36569088; the budgets are 3.03, 3.91 and 5.20 steps of these.
    budgets = {"a": 2.5e7, "b": 8.0e7, "c": 1.9e8}
    expected_n = {"a": 10752, "b": 26624, "c": 47616}
    expected_steps = {"a": 3, "b": 4, "c": 5}
    rungs = [{"name": n, "hidden_size": h, "ffn_hidden_size": 2 * h, "num_layers": 1, "num_heads": 2,
              "flops": budgets[n]} for n, h in shapes.items()]
    for name, h in shapes.items():
        model = Transformer(load_config("tiny", [f"model.hidden_size={h}", f"model.ffn_hidden_size={2 * h}",
                                                 "model.num_layers=1", "model.num_heads=2"]).model)
        n = _matmul_params_by_hand(model)
        assert n == expected_n[name] == 10 * h * h + 512 * h
        assert round(budgets[name] / (6 * n * tokens_per_step)) == expected_steps[name]
    ladder = tmp_path / "ladder.yaml"
    ladder.write_text(yaml.safe_dump({"base": "tiny", "overrides": ["train.log_every=1"], "rungs": rungs}))
    # Held-out data unlike the training data: uniform random tokens (tiny_data repeats n-gram patterns).
    rng = np.random.default_rng(11)
    heldout_docs = [rng.integers(3, 512, size=int(rng.integers(30, 140))).tolist() for _ in range(12)]
    heldout = write_indexed(tmp_path / "heldout" / "h", heldout_docs)
    result = sweep(str(ladder), tmp_path / "sweep", overrides=[f"data.prefixes=[{tiny_data}]"], eval_data=str(heldout))
    points = result["points"]
    assert [p["name"] for p in points] == ["a", "b", "c"]
    assert [p["steps"] for p in points] == [expected_steps[n] for n in shapes]
    assert [p["params"] for p in points] == [expected_n[n] for n in shapes]
    assert [p["tokens"] for p in points] == [expected_steps[n] * tokens_per_step for n in shapes]
    assert [p["flops"] for p in points] == pytest.approx(
        [6 * expected_n[n] * expected_steps[n] * tokens_per_step for n in shapes])
    for point in points:
        run_dir = tmp_path / "sweep" / "runs" / point["name"]
        steps = point["steps"]
        assert (run_dir / "checkpoints" / f"step_{steps}").is_dir()
        logged = [r for r in read_metrics(run_dir) if "event" not in r]
        assert [r["step"] for r in logged] == list(range(1, steps + 1))
        assert point["train_loss"] == pytest.approx(logged[-1]["lm_loss"])  # the last tenth of 3..5 steps
        # The held-out loss recomputed from the saved model on the eval data, by hand.
        _, model = load_model(run_dir)
        nll, count = 0.0, 0
        for doc in heldout_docs:
            doc = doc + [2]  # write_indexed appends eos
            for start in range(0, len(doc) - 1, 64):
                inputs, targets = doc[start : start + 64], doc[start + 1 : start + 65]
                inputs = inputs[: len(targets)]
                with torch.no_grad():
                    logits = model.logits(model(torch.tensor([inputs])))[0]
                nll += float(F.cross_entropy(logits, torch.tensor(targets), reduction="sum"))
                count += len(targets)
        assert point["eval_loss"] == pytest.approx(nll / count, rel=1e-5)
        assert point["loss"] == point["eval_loss"]
        assert point["eval_loss"] != pytest.approx(point["train_loss"], abs=1e-3)  # not the training loss
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["points"] == points
    assert "not a built-in ladder" in one_line_error(sweep, str(tmp_path / "nope.yaml"), tmp_path / "x")
    assert "--budget-scale" in one_line_error(sweep, "cpu", tmp_path / "x", budget_scale=0)
