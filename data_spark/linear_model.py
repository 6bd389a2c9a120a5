"""Line classifiers (quality, safety): logistic regression on hashed n-grams, scored per batch.

Training fits a small labelled seed set (hundreds to some fifteen thousand lines, all on the driver)
with SciPy's L-BFGS-B on Spark ML's logistic-regression objective: a Spark ML fit spends about 0.1 s of
job scheduling per iteration, which made the quality seed's fit take longer than the stage it serves. The learned weights are a plain vector, so scoring every sentence of the corpus is a sparse dot product
inside each Arrow batch instead of an explode-and-regroup shuffle of all sentences.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from scipy import sparse
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from haina.core.errors import InputFileError
from haina.data_spark.config import ModelTrainConfig
from haina.data_spark.features import feature_rows, featurize


@dataclass(frozen=True)
class LinearModel:
    weights: np.ndarray
    intercept: float
    shape: bool = False  # features include :func:`~haina.data_spark.features.shape_features`

    @property
    def size(self) -> int:
        return int(self.weights.shape[0])

    def logit(self, text: str) -> float:
        """Log-odds of the positive label for one line (what a threshold is compared with, unrounded)."""
        ids, values = featurize(text, self.size, self.shape)
        return float(np.dot(values, self.weights[ids])) + self.intercept

    def logits(self, texts: list[str]) -> np.ndarray:
        """:meth:`logit` of many lines at once (one sparse product over the batch's feature rows)."""
        return self.logits_and_tokens(texts)[0]

    def logits_and_tokens(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`logits`, and each line's ``approx_tokens`` from the same pass over the lines."""
        if not texts:
            return np.zeros(0), np.zeros(0, np.int64)
        rows = feature_rows(texts, self.size, self.shape)
        return rows.matrix(self.size) @ self.weights.astype(np.float64) + self.intercept, rows.approx_tokens

    def score(self, text: str) -> float:
        """Probability of the positive label for one line."""
        return sigmoid(self.logit(text))

    def save(self, path: Path) -> None:
        np.savez_compressed(path, weights=self.weights, intercept=np.array([self.intercept]),
                            shape=np.array([self.shape]))

    @classmethod
    def load(cls, path: Path) -> LinearModel:
        with np.load(path) as data:
            shape = bool(data["shape"][0]) if "shape" in data.files else False
            return cls(data["weights"].astype(np.float32), float(data["intercept"][0]), shape)


def sigmoid(logit: float) -> float:
    """The probability of a log-odds, without overflow at either end."""
    if logit >= 0:
        return 1.0 / (1.0 + math.exp(-logit))
    odds = math.exp(logit)
    return odds / (1.0 + odds)


def logit_of(probability: float) -> float:
    """The log-odds of a probability; 0 and 1 map to -inf and +inf (a cut nothing passes or all does)."""
    if probability <= 0.0:
        return float("-inf")
    if probability >= 1.0:
        return float("inf")
    return float(np.log(probability / (1.0 - probability)))


def read_seed(name: str, path: Path | None = None) -> list[tuple[float, str]]:
    """``label<TAB>line`` rows of a seed file (the packaged ``resources/<name>`` when ``path`` is None)."""
    if path is None:
        text = (resources.files("haina.data_spark") / "resources" / name).read_text(encoding="utf-8")
        where = f"resources/{name}"
    else:
        if not Path(path).is_file():
            raise InputFileError(f"{path}: seed file not found")
        text, where = Path(path).read_text(encoding="utf-8"), str(path)
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        label, sep, body = line.partition("\t")
        if not sep or label not in ("0", "1") or not body.strip():
            raise InputFileError(f"{where}:{number}: expected '0|1<TAB>text'")
        rows.append((float(label), body.strip()))
    if len({label for label, _ in rows}) < 2:
        raise InputFileError(f"{where}: needs examples of both labels")
    return rows


_TRAINED: dict[str, tuple[LinearModel, dict[str, float]]] = {}
_TRAINING = threading.Lock()  # the job fits its classifiers ahead in a thread: a second caller waits for it


def train(
    rows: list[tuple[float, str]], cfg: ModelTrainConfig, *, shape: bool = False, balanced: bool = False
) -> LinearModel:
    """Fit logistic regression; deterministic for the same rows and settings, so a model already fitted in
    this process for the same inputs is reused. ``shape`` adds the shape features; ``balanced`` weighs each
    label's examples to the same total, so the 0.5 cut does not lean towards whichever label the seed
    happens to have more of."""
    return train_and_evaluate(rows, cfg, shape=shape, balanced=balanced)[0]


def train_and_evaluate(
    rows: list[tuple[float, str]], cfg: ModelTrainConfig, *, shape: bool = False, balanced: bool = False
) -> tuple[LinearModel, dict[str, float]]:
    """:func:`train`, and the model's accuracy on its seed (recorded in the report, so that a broken seed
    set is visible), from the one featurisation of the seed."""
    key = hashlib.sha256(json.dumps([rows, cfg.model_dump(mode="json"), shape, balanced]).encode()).hexdigest()
    with _TRAINING:
        if key not in _TRAINED:
            _TRAINED[key] = _fit(rows, cfg, shape, balanced)
        return _TRAINED[key]


def feature_matrix(texts: list[str], size: int, shape: bool) -> sparse.csr_matrix:
    """Rows of hashed features (:func:`featurize`, built for all texts at once) as a sparse matrix."""
    if not texts:
        return sparse.csr_matrix((0, size))
    return feature_rows(texts, size, shape).matrix(size)


def _fit(
    rows: list[tuple[float, str]], cfg: ModelTrainConfig, shape: bool, balanced: bool
) -> tuple[LinearModel, dict[str, float]]:
    """Minimise the objective of Spark ML's ``LogisticRegression`` (weighted mean log-loss plus
    ``reg_param / 2 * |w|^2``, intercept not penalised, features not standardised) on the driver."""
    size = cfg.num_features
    x = feature_matrix([text for _, text in rows], size, shape)
    y = np.array([label for label, _ in rows], dtype=np.float64)
    weight = np.ones_like(y)
    if balanced and 0 < y.sum() < len(y):
        weight = np.where(y == 1.0, len(y) / (2 * y.sum()), len(y) / (2 * (len(y) - y.sum())))
    weight /= weight.sum()
    xt = x.T.tocsr()

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        beta, bias = theta[:-1], theta[-1]
        z = x @ beta + bias
        value = float(np.dot(weight, np.logaddexp(0.0, z) - y * z)) + 0.5 * cfg.reg_param * float(np.dot(beta, beta))
        residual = weight * (0.5 * (1.0 + np.tanh(0.5 * z)) - y)
        return value, np.concatenate([xt @ residual + cfg.reg_param * beta, [residual.sum()]])

    # SciPy's L-BFGS-B on one BLAS thread: with a thread per core its 65k-long vector operations thrash
    # (1.3 s for the quality seed on two cores against 0.3 s)
    with threadpool_limits(limits=1):
        theta = minimize(loss, np.zeros(size + 1), jac=True, method="L-BFGS-B", options={"maxiter": cfg.max_iter}).x
    model = LinearModel(theta[:-1].astype(np.float32), float(theta[-1]), shape)
    hits = (x @ model.weights.astype(np.float64) + model.intercept >= 0) == (y == 1.0)
    return model, {"examples": len(rows), "train_accuracy": round(float(hits.mean()), 4)}


def describe(model: LinearModel) -> str:
    return json.dumps({"features": model.size, "nonzero": int(np.count_nonzero(model.weights))})


def fit_and_save(
    rows: list[tuple[float, str]], cfg: ModelTrainConfig, path: Path, notes: dict, name: str,
    *, shape: bool = False, balanced: bool = False,
) -> LinearModel:
    """Train on the seed rows, keep the model beside the output (``path``), record its seed metrics."""
    model, metrics = train_and_evaluate(rows, cfg, shape=shape, balanced=balanced)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    notes[name] = dict(metrics)
    return model
