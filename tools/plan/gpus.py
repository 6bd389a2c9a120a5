"""The devices the planner knows: memory a process can use and the dense bf16 peak.

Capacities are what ``nvidia-smi`` reports as total memory (what the CUDA allocator can hand out is a
little less: the context takes its share, which the planner's runtime reserve stands for). Peaks come from
:func:`haina.core.metrics.peak_tflops_of`, the table the training loop's MFU uses, by the device name CUDA
reports, so the planner's MFU and the run's metrics agree on the denominator.
"""

from __future__ import annotations

from dataclasses import dataclass

from haina.core.errors import ConfigError
from haina.core.metrics import peak_tflops_of

GIB = 2**30


@dataclass(frozen=True)
class Target:
    """A device: name, memory in GiB, the name CUDA reports (for the peak), and its device type."""

    name: str
    memory_gib: float
    device_name: str
    device_type: str = "cuda"

    @property
    def peak_tflops(self) -> float | None:
        return peak_tflops_of(self.device_name) if self.device_type == "cuda" else None

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GIB


# nvidia-smi's total memory in MiB / 1024 (an "80 GB" H100 shows 81,559 MiB, an H200 143,771 MiB)
GPUS: dict[str, Target] = {t.name: t for t in (
    Target("h100-80gb", 81559 / 1024, "NVIDIA H100 80GB HBM3"),
    Target("h100-pcie", 81559 / 1024, "NVIDIA H100 PCIe"),
    Target("h800", 81559 / 1024, "NVIDIA H800"),
    Target("h200", 143771 / 1024, "NVIDIA H200"),
    Target("a100-80gb", 81920 / 1024, "NVIDIA A100-SXM4-80GB"),
    Target("a800-80gb", 81920 / 1024, "NVIDIA A800-SXM4-80GB"),
    Target("a100-40gb", 40960 / 1024, "NVIDIA A100-SXM4-40GB"),
    Target("l40s", 46068 / 1024, "NVIDIA L40S"),
)}

# The host CPU as a target: what tools/bench/plan_check measures the formulas against (no peak, no limit).
CPU = Target("cpu", float("inf"), "cpu", device_type="cpu")


def gpu(name: str) -> Target:
    """The target called ``name`` (case-insensitive); an unknown name fails in one line with the known ones."""
    key = name.lower()
    if key == CPU.name:
        return CPU
    if key not in GPUS:
        raise ConfigError(f"--gpu {name!r}: unknown device; known: {', '.join(GPUS)}")
    return GPUS[key]
