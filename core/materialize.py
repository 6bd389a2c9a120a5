"""Materialising a model built on the meta device: each rank allocates and fills only its own shards.

Trained and frozen models are created on the meta device and cut there by the layout (pipeline stages,
tensor parallelism, FSDP2), so no rank ever holds the whole model. :func:`materialize` then allocates
this rank's shards on the device and, when the weights are not about to be loaded, initialises them.

Initial values do not depend on the layout: each module's parameters are drawn at their full (global)
shape from the RNG seeded by (run seed, the module's qualified name), one module at a time, and each rank
keeps its slice (``distribute_tensor`` with no source rank: every rank drew the same values, nothing is
sent). A rank therefore holds its shards plus one module's full tensors at any moment, and a model cut
for tp=2 x pp=2 x dp_shard=2 starts from exactly the weights of the one-process model.

The rule for a module comes from the nearest enclosing module with an ``init_module(name, module)``
method (the :class:`~haina.core.model.Transformer`: normal(0, std) matrices, depth-scaled residual
outputs); any other module that owns parameters is reset by its own ``reset_parameters``.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from haina.core.errors import PluginError

InitRule = Callable[[nn.Module], bool]


def init_key(seed: int, name: str) -> int:
    """The RNG seed of the module called ``name`` in a run seeded ``seed`` (stable across processes)."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def owns_state(module: nn.Module) -> bool:
    """Whether ``module`` itself (not its children) holds parameters or buffers."""
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def _within(prefix: str, name: str) -> bool:
    return not prefix or name == prefix or name.startswith(prefix + ".")


def _rules(model: nn.Module) -> Iterator[tuple[str, nn.Module, InitRule | None]]:
    """(qualified name, module, rule) of every module holding state; ``None``: ``reset_parameters``."""
    owners: list[tuple[str, Callable[[str, nn.Module], bool]]] = []  # (prefix, init_module), outermost first
    for name, module in model.named_modules():
        while owners and not _within(owners[-1][0], name):
            owners.pop()
        if owns_state(module):
            rule = None
            if owners:
                prefix, init_module = owners[-1]
                rule = functools.partial(init_module, name[len(prefix) + 1 :] if prefix else name)
            yield name, module, rule
        method = getattr(module, "init_module", None)
        if callable(method):
            owners.append((name, method))


def _full_tensors(module: nn.Module) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """Swap each DTensor parameter/buffer of ``module`` (not its children) for a plain tensor of the
    global shape on the same device; {(slot, name): (the DTensor, the stand-in)}."""
    from torch.distributed.tensor import DTensor

    swapped: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for slot in ("_parameters", "_buffers"):
        table = getattr(module, slot)
        for name, value in list(table.items()):
            if isinstance(value, DTensor):
                full = torch.empty(value.shape, dtype=value.dtype, device=value.to_local().device)
                table[name] = nn.Parameter(full, requires_grad=value.requires_grad) if slot == "_parameters" else full
                swapped[(slot, name)] = (value, full)
    return swapped


def _keep_slices(module: nn.Module, swapped: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Put the DTensors back, each filled with its slice of the full values its stand-in received."""
    for (slot, name), (shard, full) in swapped.items():
        getattr(module, slot)[name] = shard
        fill_from_full(shard, full.detach())


def fill_from_full(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a tensor's full (global) value into ``target``: all of it, or this rank's slice of a DTensor
    (a view of ``full``: every rank holds the same values, so nothing is sent and nothing copied but
    the slice itself)."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        if isinstance(target, DTensor):
            target.to_local().copy_(local_slice(full, target.device_mesh, target.placements))
        else:
            target.copy_(full)


def local_slice(full: torch.Tensor, mesh: Any, placements: Sequence[Any]) -> torch.Tensor:
    """This rank's piece of ``full`` under ``placements`` on ``mesh``, as a view (``torch.chunk``
    semantics, as DTensor and FSDP2 cut). A strided shard (FSDP2 over a tensor-parallel dim 0) is cut
    after the shard of the later mesh dimension on the same tensor dimension: tp first, then dp."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    coordinate = mesh.get_coordinate()
    if coordinate is None:  # this rank is not in the mesh
        raise ValueError("local_slice: this rank holds no part of the mesh")
    order: list[int] = []
    deferred: list[int] = []
    for i, placement in enumerate(placements):
        if isinstance(placement, _StridedShard):
            deferred.append(i)
            continue
        order.append(i)
        if isinstance(placement, Shard):
            released = [j for j in deferred if placements[j].dim == placement.dim]
            order += released
            deferred = [j for j in deferred if j not in released]
    view = full
    for i in [*order, *deferred]:
        placement = placements[i]
        if isinstance(placement, Shard | _StridedShard):
            pieces = torch.chunk(view, mesh.size(i), dim=placement.dim)
            c = coordinate[i]
            view = pieces[c] if c < len(pieces) else view.narrow(placement.dim, 0, 0)
        elif not isinstance(placement, Replicate):
            raise ValueError(f"local_slice: a parameter cannot be {placement}")
    return view


def _cuda_indices(devices: list[torch.device]) -> list[int]:
    return sorted({d.index or 0 for d in devices if d.type == "cuda"})


@torch.no_grad()
def _init_one(name: str, module: nn.Module, rule: InitRule | None, seed: int) -> None:
    swapped = _full_tensors(module)
    try:
        torch.manual_seed(init_key(seed, name))
        if rule is None or not rule(module):
            _reset(name, module)
    finally:
        _keep_slices(module, swapped)


def init_weights(model: nn.Module, seed: int) -> None:
    """Initialise every parameter of ``model`` (plain or sharded) in place, independently of the layout."""
    with torch.random.fork_rng(devices=_cuda_indices([p.device for p in model.parameters()])):
        for name, module, rule in _rules(model):
            _init_one(name, module, rule, seed)


def materialize_each(
    model: nn.Module, device: torch.device, seed: int, then: Callable[[nn.Module], None]
) -> nn.Module:
    """:func:`materialize` one module at a time (its own parameters and buffers), each handed to ``then``
    as soon as it is initialised: a backend that partitions parameters as they are built (DeepSpeed's
    ZeRO-3) then never holds more than one module's full tensors. Same order and values as
    :func:`init_weights`."""
    with torch.random.fork_rng(devices=_cuda_indices([device])):
        for name, module, rule in _rules(model):
            module.to_empty(device=device, recurse=False)
            _init_one(name, module, rule, seed)
            then(module)
    return model


def _reset(name: str, module: nn.Module) -> None:
    """The module's own ``reset_parameters``; a module with state and none is refused in one line (its
    constructor's values were never computed: it ran on the meta device)."""
    if not callable(getattr(module, "reset_parameters", None)):
        state = next(n for n, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)])
        raise PluginError(
            f"{name or 'the model'} ({type(module).__module__}.{type(module).__name__}) holds {state!r} but has no "
            "reset_parameters(): models are built on the meta device, so a module fills its own parameters "
            "and buffers there (add reset_parameters())"
        )
    module.reset_parameters()


@torch.no_grad()
def refill_buffers(model: nn.Module) -> None:
    """Recompute derived (non-persistent) buffers, which checkpoints do not hold (ALiBi slopes), before
    the weights are loaded."""
    for name, module in model.named_modules():
        if getattr(module, "_non_persistent_buffers_set", None):
            _reset(name, module)


def build(make: Callable[[], nn.Module], device: torch.device, seed: int) -> nn.Module:
    """``make()`` run on the meta device; for another ``device`` materialised there whole and
    initialised from ``seed`` (what an algorithm's ``build_model`` returns for either)."""
    with torch.device("meta"):
        model = make()
    return model if device.type == "meta" else materialize(model, device, seed)


def materialize(model: nn.Module, device: torch.device | str, seed: int | None) -> nn.Module:
    """Allocate ``model``'s (meta) shards on ``device``; initialise them from ``seed``, or with ``None``
    (weights to be loaded next) leave them uninitialised but for derived buffers. Returns ``model``."""
    model.to_empty(device=device)
    if seed is None:
        refill_buffers(model)
    else:
        init_weights(model, seed)
    return model
