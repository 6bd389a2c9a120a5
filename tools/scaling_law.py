"""``haina scaling-law sweep|fit``: a ladder of model sizes, each trained for a FLOP budget, and the fit of
L(C) = a * C^b + L_inf to their (compute, final loss) points, as in the Baichuan 2 report.

Compute is C = 6 * N * D with N the matmul parameters (blocks plus the output head; the embedding is a
lookup) and D the training tokens, so a rung's step count is budget / (6 * N * tokens_per_step).

The fit is done in log space (residuals log f(C) - log L, i.e. relative errors, with C scaled by its
geometric mean): the points span orders of magnitude in C and the raw a * C^b is badly conditioned.
Uncertainties come from the fit's covariance, carried to a, to predictions and to the plot.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from haina.core.config import ModelConfig, load_config
from haina.core.distributed import is_main_process
from haina.core.errors import ConfigError, InputFileError
from haina.core.files import read_yaml
from haina.core.model_loading import load_model
from haina.core.train import train
from haina.tools.eval.perplexity import nll_sum, read_documents, windows


@dataclass(frozen=True)
class Rung:
    """One model size of the ladder and its training budget in FLOPs."""

    name: str
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    flops: float


# The report's seven scaling-law shapes (hidden / FFN / layers / heads), 10M to 3B parameters, each with
# about 20 tokens per parameter of its Baichuan-vocabulary size (budgets for real runs on GPUs).
_BAICHUAN2_SHAPES = [
    ("10M", 384, 1152, 6, 6), ("50M", 704, 2112, 8, 8), ("100M", 832, 2496, 12, 8),
    ("200M", 1216, 3648, 16, 8), ("500M", 1792, 5376, 20, 14), ("1B", 2240, 6720, 24, 16),
    ("3B", 2880, 8640, 28, 20),
]
# A CPU ladder for 2 cores (vocab 4096, 128-token sequences, the demo corpus): five sizes from 0.16M to
# 1.4M matmul parameters, budgets growing ~2.5x a rung (0.13M to 0.48M tokens, a third of an epoch of
# the demo corpus at most); about 5 minutes on 2 idle cores. Far from compute-optimal: it shows the
# machinery, not a law of this data.
_CPU_SHAPES = [
    ("xs", 32, 96, 2, 2, 1.2e11), ("s", 48, 144, 2, 2, 2.8e11), ("m", 64, 192, 3, 2, 6.5e11),
    ("l", 96, 288, 3, 3, 1.6e12), ("xl", 128, 384, 4, 4, 4.0e12),
]
LADDERS: dict[str, dict[str, Any]] = {
    "baichuan2": {
        "base": "baichuan2-7b",
        "overrides": ["train.seq_len=4096"],
        "tokens_per_param": 20,
        "rungs": [dict(zip(("name", "hidden_size", "ffn_hidden_size", "num_layers", "num_heads"), s, strict=True))
                  for s in _BAICHUAN2_SHAPES],
    },
    "cpu": {
        "base": "demo",
        "overrides": ["model.vocab_size=4096", "train.seq_len=128", "train.micro_batch_size=8", "optim.lr=3e-3",
                      "optim.min_lr=3e-4", "train.log_every=5"],
        "rungs": [dict(zip(("name", "hidden_size", "ffn_hidden_size", "num_layers", "num_heads", "flops"), s,
                           strict=True)) for s in _CPU_SHAPES],
    },
}


def matmul_params(model: ModelConfig) -> int:
    """N of C = 6ND: attention and MLP matrices of every block plus the output head."""
    h = model.hidden_size
    return model.num_layers * (4 * h * h + 3 * h * model.ffn_size) + model.vocab_size * h


def read_ladder(ladder: str) -> dict[str, Any]:
    """A built-in ladder by name or a YAML file with ``base``, ``overrides`` and ``rungs``."""
    if ladder in LADDERS:
        return LADDERS[ladder]
    path = Path(ladder)
    if not path.is_file():
        raise ConfigError(f"--ladder {ladder!r}: not a built-in ladder ({', '.join(LADDERS)}) or a YAML file")
    data = read_yaml(path, what="ladder")
    if not isinstance(data.get("rungs"), list) or not data["rungs"]:
        raise InputFileError(f"{path}: a ladder needs a non-empty 'rungs' list")
    return data


def _rungs(ladder: dict[str, Any], cfg_of: Any) -> list[tuple[Rung, Any]]:
    out = []
    for raw in ladder["rungs"]:
        try:
            shape = {k: int(raw[k]) for k in ("hidden_size", "ffn_hidden_size", "num_layers", "num_heads")}
            name = str(raw.get("name", f"h{shape['hidden_size']}"))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputFileError(f"ladder rung {raw!r}: missing or bad field {exc}") from None
        cfg = cfg_of(shape)
        n = matmul_params(cfg.model)
        flops = float(raw["flops"]) if "flops" in raw else 6.0 * n * float(ladder["tokens_per_param"]) * n
        out.append((Rung(name, flops=flops, **shape), cfg))
    return out


def sweep(
    ladder: str, out: str | Path, *, base: str | None = None, overrides: Sequence[str] = (), budget_scale: float = 1.0,
    eval_data: str | None = None,
) -> dict[str, Any]:
    """Train every rung for its budget; write and return ``out/sweep.json`` (updated after each rung).

    The loss of a rung is its held-out cross-entropy on ``eval_data`` (a .bin/.idx prefix) when given, else
    the mean training cross-entropy over the last tenth of its steps.
    """
    if budget_scale <= 0:
        raise ConfigError(f"--budget-scale must be positive, got {budget_scale}")
    spec = read_ladder(ladder)
    out = Path(out)

    def cfg_of(shape: dict[str, int], extra: Sequence[str] = ()) -> Any:
        model = [f"model.{k}={v}" for k, v in shape.items()]
        return load_config(base or spec.get("base"), [*spec.get("overrides", []), *model, *overrides, *extra])

    result: dict[str, Any] = {"ladder": ladder, "overrides": list(overrides), "points": []}
    for rung, cfg in _rungs(spec, cfg_of):
        n = matmul_params(cfg.model)
        tokens_per_step = (cfg.train.global_batch_size or cfg.train.micro_batch_size) * cfg.train.seq_len
        steps = max(1, round(rung.flops * budget_scale / (6 * n * tokens_per_step)))
        run_dir = out / "runs" / rung.name
        shape = {k: v for k, v in asdict(rung).items() if k not in ("name", "flops")}
        cfg = cfg_of(shape, [
            f"train.steps={steps}", f"train.save_every={steps}", f"optim.warmup_steps={max(1, steps // 20)}",
            f"train.run_dir={json.dumps(str(run_dir))}", "train.resume=false", "train.progress=false",
        ])
        started = time.perf_counter()
        records = train(cfg).records
        tail = records[-max(1, len(records) // 10):]
        point: dict[str, Any] = {
            "name": rung.name, **shape, "params": n, "steps": steps, "tokens": steps * tokens_per_step,
            "flops": 6.0 * n * steps * tokens_per_step,
            "train_loss": sum(r.get("lm_loss", r["loss"]) for r in tail) / len(tail),
        }
        if eval_data is not None:
            point["eval_loss"] = heldout_loss(run_dir, eval_data, cfg.train.seq_len)
        point["loss"] = point.get("eval_loss", point["train_loss"])
        point["seconds"] = time.perf_counter() - started
        result["points"].append(point)
        if is_main_process():  # under torchrun every rank trains each rung; one writes the record
            out.mkdir(parents=True, exist_ok=True)
            (out / "sweep.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def heldout_loss(run_dir: Path, prefix: str, seq_len: int, max_windows: int = 256) -> float:
    """Mean cross-entropy per token of the run's final model on the first windows of a .bin/.idx set."""
    _, model = load_model(run_dir)
    docs = [d for docs in read_documents([prefix], None).values() for d in docs]
    pieces = windows(docs, seq_len)[:max_windows]
    nll, count = 0.0, 0
    for start in range(0, len(pieces), 16):
        n, c = nll_sum(model, pieces[start : start + 16])
        nll, count = nll + n, count + c
    return nll / count


# ------------------------------------------------------------------------------------------------ fit

@dataclass
class Fit:
    """L(C) = a * C^b + L_inf with 1-sigma errors; ``cov`` is over (alpha, b, L_inf), alpha = log of the
    scale at C = c_ref (the parametrisation actually fitted)."""

    a: float
    b: float
    l_inf: float
    a_err: float
    b_err: float
    l_inf_err: float
    c_ref: float
    alpha: float
    cov: list[list[float]]

    def predict(self, flops: float) -> tuple[float, float]:
        """(loss, 1-sigma error) at compute ``flops``."""
        x = flops / self.c_ref
        term = math.exp(self.alpha) * x**self.b
        grad = np.array([term, term * math.log(x), 1.0])
        var = float(grad @ np.array(self.cov) @ grad)
        return self.l_inf + term, math.sqrt(var) if math.isfinite(var) and var >= 0 else float("nan")


def fit_power_law(flops: Sequence[float], losses: Sequence[float]) -> Fit:
    """Least-squares fit of L(C) = a * C^b + L_inf (b < 0, 0 <= L_inf < min L), from several starts."""
    from scipy.optimize import curve_fit

    c = np.asarray(flops, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    if c.ndim != 1 or c.shape != y.shape or len(c) < 3:
        raise ValueError(f"the fit needs at least 3 (compute, loss) points, got {len(c)}")
    if not (np.all(np.isfinite(c)) and np.all(np.isfinite(y)) and np.all(c > 0) and np.all(y > 0)):
        raise ValueError("compute and loss must be finite and positive")
    if len(np.unique(c)) < 3:
        raise ValueError("the fit needs at least 3 distinct compute values")
    c_ref = float(np.exp(np.mean(np.log(c))))
    x = np.log(c / c_ref)

    def log_model(x: np.ndarray, alpha: float, b: float, l_inf: float) -> np.ndarray:
        return np.log(l_inf + np.exp(alpha + b * x))

    best = None
    upper = float(y.min()) * (1 - 1e-9)
    for share in (0.0, 0.5, 0.8, 0.95):
        l0 = share * float(y.min())
        slope, intercept = np.polyfit(x, np.log(y - l0), 1)
        p0 = [intercept, float(np.clip(slope, -4.9, -1e-3)), l0]
        try:
            params, cov = curve_fit(log_model, x, np.log(y), p0=p0, bounds=([-50, -5, 0], [50, 0, upper]),
                                    maxfev=20000)
        except RuntimeError:
            continue
        sse = float(np.sum((log_model(x, *params) - np.log(y)) ** 2))
        if best is None or sse < best[0]:
            best = (sse, params, cov)
    if best is None:
        raise ValueError("the power-law fit did not converge on these points")
    _, (alpha, b, l_inf), cov = best
    log_cref = math.log(c_ref)
    a = math.exp(alpha - b * log_cref)
    var_log_a = cov[0, 0] + log_cref**2 * cov[1, 1] - 2 * log_cref * cov[0, 1]
    err = np.sqrt(np.clip(np.diag(cov), 0, None))
    return Fit(
        a=a, b=float(b), l_inf=float(l_inf), a_err=a * math.sqrt(max(var_log_a, 0.0)), b_err=float(err[1]),
        l_inf_err=float(err[2]), c_ref=c_ref, alpha=float(alpha), cov=cov.tolist(),
    )


def plot_fit(fit: Fit, points: list[dict], out: Path, held: dict | None, target: tuple[float, float, float] | None) -> Path:
    """PNG: fitted points, the curve with its 1-sigma band, the held-out point, the prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p["flops"] for p in points] + ([held["flops"]] if held else []) + ([target[0]] if target else [])
    grid = np.geomspace(min(xs) / 1.5, max(xs) * 1.5, 200)
    pred = np.array([fit.predict(g) for g in grid])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(grid, pred[:, 0], color="C0", label=f"fit: {fit.a:.3g}·C^({fit.b:.3f}) + {fit.l_inf:.3f}")
    if np.all(np.isfinite(pred[:, 1])):
        ax.fill_between(grid, pred[:, 0] - pred[:, 1], pred[:, 0] + pred[:, 1], color="C0", alpha=0.15)
    ax.axhline(fit.l_inf, color="gray", linestyle="--", linewidth=1, label=f"L_inf = {fit.l_inf:.3f}")
    ax.scatter([p["flops"] for p in points], [p["loss"] for p in points], color="C0", zorder=3, label="fitted runs")
    for p in points + ([held] if held else []):
        ax.annotate(p.get("name", ""), (p["flops"], p["loss"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if held:
        ax.scatter([held["flops"]], [held["loss"]], color="C3", marker="*", s=140, zorder=4, label="held-out run (measured)")
    if target:
        ax.errorbar([target[0]], [target[1]], yerr=[target[2]], color="C2", marker="D", capsize=4, zorder=4,
                    label="prediction")
    ax.set_xscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("final loss (nats/token)")
    ax.set_title("Scaling law L(C) = a·C^b + L_inf")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def fit_command(
    sweep_path: str | Path, out: str | Path | None = None, *, holdout_largest: bool = False,
    target_flops: float | None = None, target_params: float | None = None, target_tokens: float | None = None,
) -> str:
    """Fit a sweep.json, write PREFIX.json and PREFIX.png, return a short text summary."""
    path = Path(sweep_path)
    try:
        points = json.loads(path.read_text(encoding="utf-8"))["points"]
        points = [dict(p, flops=float(p["flops"]), loss=float(p["loss"])) for p in points]
    except FileNotFoundError:
        raise InputFileError(f"--sweep {path}: no such file") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise InputFileError(f"--sweep {path}: not a sweep.json ({type(exc).__name__}: {exc})") from None
    if (target_params is None) != (target_tokens is None):
        raise ConfigError("--target-params and --target-tokens go together")
    if target_params is not None and target_tokens is not None:
        target_flops = 6.0 * target_params * target_tokens
    if target_flops is not None and target_flops <= 0:
        raise ConfigError(f"target compute must be positive, got {target_flops}")
    points.sort(key=lambda p: p["flops"])
    held = points[-1] if holdout_largest else None
    used = points[:-1] if holdout_largest else points
    try:
        fit = fit_power_law([p["flops"] for p in used], [p["loss"] for p in used])
    except ValueError as exc:  # the points cannot be fitted: the sweep's fault, not the program's
        raise InputFileError(f"--sweep {path}: {exc}") from None
    report: dict[str, Any] = {"sweep": str(path), "fit": asdict(fit), "points": used}
    lines = [
        f"L(C) = a * C^b + L_inf over {len(used)} runs:",
        f"  a = {fit.a:.4g} ± {fit.a_err:.2g}   b = {fit.b:.4f} ± {fit.b_err:.2g}   L_inf = {fit.l_inf:.4f} ± {fit.l_inf_err:.2g}",
    ]
    if held is not None:
        predicted, error = fit.predict(held["flops"])
        report["holdout"] = {**held, "predicted": predicted, "predicted_err": error, "error": predicted - held["loss"]}
        lines.append(f"  held out {held.get('name', '')} (C = {held['flops']:.3g}): predicted {predicted:.4f} ± {error:.2g}, "
                     f"measured {held['loss']:.4f} ({100 * (predicted - held['loss']) / held['loss']:+.2f}%)")
    target = None
    if target_flops is not None:
        predicted, error = fit.predict(target_flops)
        target = (target_flops, predicted, error)
        report["target"] = {"flops": target_flops, "predicted": predicted, "predicted_err": error}
        lines.append(f"  target C = {target_flops:.3g}: predicted loss {predicted:.4f} ± {error:.2g}")
    prefix = Path(out) if out is not None else path.with_name("fit")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    png = plot_fit(fit, used, prefix.with_suffix(".png"), held, target)
    prefix.with_suffix(".json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    lines.append(f"  wrote {prefix.with_suffix('.json')} and {png}")
    return "\n".join(lines)
