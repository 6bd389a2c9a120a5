"""Line classifiers (quality, safety): Spark ML logistic regression on hashed n-grams, scored per batch.

Training runs in Spark ML on a small labelled seed set; the learned weights are then a plain vector,
so scoring every sentence of the corpus is a sparse dot product inside each Arrow batch instead of an
explode-and-regroup shuffle of all sentences.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from pyspark.sql import SparkSession

from haina.core.errors import InputFileError
from haina.data_spark.config import ModelTrainConfig
from haina.data_spark.features import featurize


@dataclass(frozen=True)
class LinearModel:
    weights: np.ndarray
    intercept: float

    @property
    def size(self) -> int:
        return int(self.weights.shape[0])

    def score(self, text: str) -> float:
        """Probability of the positive label for one line."""
        ids, values = featurize(text, self.size)
        logit = float(values @ self.weights[ids]) + self.intercept
        return float(1.0 / (1.0 + np.exp(-logit)))

    def save(self, path: Path) -> None:
        np.savez_compressed(path, weights=self.weights, intercept=np.array([self.intercept]))

    @classmethod
    def load(cls, path: Path) -> LinearModel:
        with np.load(path) as data:
            return cls(data["weights"].astype(np.float32), float(data["intercept"][0]))


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


_TRAINED: dict[str, LinearModel] = {}


def train(spark: SparkSession, rows: list[tuple[float, str]], cfg: ModelTrainConfig) -> LinearModel:
    """Fit logistic regression in Spark ML; deterministic for the same rows and settings, so a model
    already fitted in this process for the same inputs is reused."""
    key = hashlib.sha256(json.dumps([rows, cfg.model_dump(mode="json")]).encode()).hexdigest()
    if key not in _TRAINED:
        _TRAINED[key] = _fit(spark, rows, cfg)
    return _TRAINED[key]


def _fit(spark: SparkSession, rows: list[tuple[float, str]], cfg: ModelTrainConfig) -> LinearModel:
    from pyspark.ml.classification import LogisticRegression
    from pyspark.ml.linalg import SparseVector

    size = cfg.num_features
    data = []
    for label, text in rows:
        ids, values = featurize(text, size)
        data.append((label, SparseVector(size, ids.tolist(), values.tolist())))
    frame = spark.createDataFrame(data, ["label", "features"]).coalesce(1)
    fitted = LogisticRegression(maxIter=cfg.max_iter, regParam=cfg.reg_param, standardization=False).fit(frame)
    weights = fitted.coefficients.toArray().astype(np.float32)
    return LinearModel(weights, float(fitted.intercept))


def evaluate(model: LinearModel, rows: list[tuple[float, str]]) -> dict[str, float]:
    """Training accuracy, recorded in the report so a broken seed set is visible."""
    hits = sum(1 for label, text in rows if (model.score(text) >= 0.5) == (label == 1.0))
    return {"examples": len(rows), "train_accuracy": round(hits / len(rows), 4)}


def describe(model: LinearModel) -> str:
    return json.dumps({"features": model.size, "nonzero": int(np.count_nonzero(model.weights))})


def fit_and_save(
    spark: SparkSession, rows: list[tuple[float, str]], cfg: ModelTrainConfig, path: Path, notes: dict, name: str
) -> LinearModel:
    """Train on the seed rows, keep the model beside the output (``path``), record its seed metrics."""
    model = train(spark, rows, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    notes[name] = evaluate(model, rows)
    return model
