"""Run metrics: one JSON object per logged step in metrics.jsonl, the same scalars in TensorBoard.

Events (skipped updates, rollbacks, preemption) are records with an ``event`` key, so one file tells the
whole story of a run. TensorBoard is written as event files only; no server is started here (``tensorboard
--logdir`` binds localhost by default and should stay so).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from haina.core.config import ModelConfig
from haina.core.files import write_durable

# Dense bf16 peak TFLOPS by the words of the device name, most specific first (an H100 PCIe is not an
# SXM part); unknown devices (CPUs) report no MFU.
PEAK_BF16_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H100", "PCIE"), 756.0), (("H800", "PCIE"), 756.0),
    (("H100", "NVL"), 835.0), (("H200", "NVL"), 835.0),
    (("H200",), 989.0), (("H100",), 989.0), (("H800",), 989.0),
    (("A100",), 312.0), (("A800",), 312.0), (("L40S",), 362.0),
)


def peak_tflops_of(name: str) -> float | None:
    """The dense bf16 peak of a device called ``name`` (``torch.cuda.get_device_name``), or None."""
    words = name.upper().replace("-", " ").split()
    return next((peak for keys, peak in PEAK_BF16_TFLOPS if all(k in words for k in keys)), None)


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per token: 6 x matmul parameters plus the attention score terms."""
    h, layers = cfg.hidden_size, cfg.num_layers
    matmul_params = layers * (4 * h * h + 3 * h * cfg.ffn_size) + cfg.vocab_size * h
    attention = 12 * layers * h * seq_len / 2  # causal: half the score matrix
    return 6 * matmul_params + attention


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return peak_tflops_of(torch.cuda.get_device_name(device))


class MetricsWriter:
    """Appends to metrics.jsonl (kept across resumes) and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = (run_dir / "metrics.jsonl").open("a", encoding="utf-8")
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = int(record["step"])
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tb.add_scalar(f"train/{key}", value, step)

    def event(self, kind: str, step: int, **values: Any) -> None:
        """One line ``{"step", "event": kind, ...}``; non-finite floats are written as JSON NaN/Infinity."""
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": step, "event": kind, **values}) + "\n")
        self._file.flush()
        self._tb.add_scalar(f"events/{kind}", 1, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume from ``step``: drop records of later steps (computed again now) and a torn last line."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if int(record.get("step", 0)) <= step:
            kept.append(line + "\n")
    write_durable(path, "".join(kept))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
