"""Which kernels a run would use here: attention kernel, norm, optimizer and compile, for ``haina plugins``.

The choices themselves are made where they take effect (:mod:`haina.plugins.model.attention_auto`,
:class:`haina.plugins.model.norm.RMSNorm`, :func:`haina.core.optim.build_optimizer`); this module only asks the
same functions, so the report cannot drift from what training does.
"""

from __future__ import annotations

import torch

from haina.core import attention as kernels
from haina.core.config import HainaConfig
from haina.core.optim import apex_adam_available
from haina.plugins.model import norm


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def backend_report(cfg: HainaConfig | None = None, device: torch.device | None = None) -> list[str]:
    """Lines describing the selection for ``cfg`` (default config) on ``device`` (default: this machine)."""
    cfg = cfg or HainaConfig()
    device = device or _device()
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    bias_kind = kernels.position_bias_kind(cfg.model.position)
    lines = [f"selection on {device.type}, {str(dtype).removeprefix('torch.')}, position {cfg.model.position}:"]
    name = cfg.model.attention
    if name == "auto":
        lines.append(f"  attention  auto -> {kernels.select_kernel(bias_kind, device.type, dtype)}")
    else:
        why = kernels.unsuitable(name, bias_kind, device.type, dtype)
        lines.append(f"  attention  {name}" + (f" (unusable here: {why})" if why else ""))
    for kernel in [n for n in kernels.registry.names("attention") if n != "auto"]:
        why = kernels.unsuitable(kernel, bias_kind, device.type, dtype)
        lines.append(f"    {kernel:<9} {'ok' if why is None else why}")
    fused_norm = device.type == "cuda" and norm.apex_available()
    lines.append(f"  norm       {cfg.model.norm} -> {'apex fused RMSNorm' if fused_norm else 'torch rms_norm'}")
    if device.type == "cuda" and apex_adam_available():
        optim = "apex FusedAdam (plain CUDA params; torch fused AdamW under FSDP/TP)"
    else:
        optim = "torch AdamW" + (" (fused)" if device.type == "cuda" else "")
    lines.append(f"  optimizer  {optim}")
    lines.append(f"  compile    {'per block' if cfg.parallel.compile else 'off'} (parallel.compile)")
    return lines


def print_backend_report(cfg: HainaConfig | None = None) -> None:
    """What ``haina plugins`` prints after the registry listing."""
    print("\n".join(backend_report(cfg)))
