"""Tensor and sequence parallelism (Megatron's column/row split) applied from outside with DTensor.

Every component that owns parameters or buffers declares its own plan, so a third-party plugin needs no
change here: a method ``tp_plan(self, sequence_parallel: bool) -> dict[str, ParallelStyle | list]`` whose
keys are submodule names relative to the component (``""`` is the component itself). A plugin class that
cannot carry the method (someone else's module) declares a plan function at registration
(``register(kind, name, tp_plan=fn)``, ``fn(module, sequence_parallel) -> plan``); the engine's own
modules (the ``Transformer`` and its ``Attention``) have their plans here. :func:`apply_tensor_parallel` collects every plan, refuses a model in which some
module with parameters or buffers is covered by none, and only then applies them.

The contract between components, which every built-in plan keeps:

- The residual stream between components is a plain local tensor: the full ``[b, s, h]`` on every tp rank
  without sequence parallelism, this rank's sequence shard ``[b, s / tp, h]`` with it (Shard(1)).
- A norm maps the stream to the stream's layout (SequenceParallel, or replicated weights).
- Attention and MLP gather their input to full sequences when sequence parallel, compute on their own
  heads / FFN columns, and hand back the stream's layout (all-reduce, or reduce-scatter under SP).
- A model part (the whole model or a pipeline stage) takes and returns full-sequence, replicated tensors,
  so pipeline stages exchange ordinary activations and positions are derived from the full length.
- Parameters are DTensors on the 1-D tp mesh (Shard or Replicate), so FSDP2 on the data-parallel mesh
  composes into 2-D sharding and DCP reshards them like any other DTensor.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    parallelize_module,
)

from haina.core import collectives, registry
from haina.core.errors import PluginError
from haina.core.materialize import owns_state
from haina.core.model import Attention, Transformer

__all__ = [
    "PackedColwiseParallel",
    "ReplicatedParallel",
    "ShardHeads",
    "TensorParallelError",
    "TPPlan",
    "VocabParallelEmbedding",
    "VocabParallelHead",
    "apply_tensor_parallel",
    "collect_tp_plans",
    "sequence_gather",
    "sequence_scatter",
]

TPPlan = dict[str, ParallelStyle | Sequence[ParallelStyle]]
PlanFn = Callable[[nn.Module, bool], TPPlan]


class TensorParallelError(PluginError):
    """A model that cannot be tensor-parallelized as asked; the message is one line naming the module."""


def _registered_plan(cls: type) -> PlanFn | None:
    """The ``tp_plan`` declared at the registration of ``cls`` (or of a base class), if any."""
    for base in cls.__mro__:
        for e in registry.entries():
            if e.tp_plan is not None and e.obj is base:
                return e.tp_plan
    return None


def _plan_of(module: nn.Module, sequence_parallel: bool) -> TPPlan | None:
    method = getattr(module, "tp_plan", None)
    if callable(method):
        return method(sequence_parallel)
    if isinstance(module, Transformer):
        return _transformer_plan(module, sequence_parallel)
    if isinstance(module, Attention):
        return _attention_plan(sequence_parallel)
    fn = _registered_plan(type(module))
    return None if fn is None else fn(module, sequence_parallel)


def collect_tp_plans(model: nn.Module, sequence_parallel: bool) -> list[tuple[str, nn.Module, ParallelStyle]]:
    """(qualified name, module, style) in application order: parents' entries before their children's.

    Raises :class:`TensorParallelError` for a module holding parameters or buffers that no plan covers,
    since leaving it alone would silently replicate it with the wrong (full-width) shapes.
    """
    entries: list[tuple[str, nn.Module, ParallelStyle]] = []
    covered: set[int] = set()
    for name, module in model.named_modules():
        plan = _plan_of(module, sequence_parallel)
        if plan is None:
            continue
        for key, styles in plan.items():
            try:
                target = module.get_submodule(key) if key else module
            except AttributeError:
                raise TensorParallelError(
                    f"tensor parallelism: the plan of {name or 'the model'} ({type(module).__name__}) "
                    f"names {key!r}, which it does not have"
                ) from None
            full = ".".join(part for part in (name, key) if part)
            for style in [styles] if isinstance(styles, ParallelStyle) else styles:
                entries.append((full, target, style))
            covered.add(id(target))
    for name, module in model.named_modules():
        if owns_state(module) and id(module) not in covered:
            raise TensorParallelError(
                f"tensor parallelism: {name or 'the model'} ({type(module).__name__}) has parameters or "
                f"buffers but no TP plan; give {type(module).__name__} a tp_plan(sequence_parallel) method "
                "or declare one at registration (register(..., tp_plan=fn))"
            )
    return entries


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Shard ``model`` in place over the 1-D ``tp_mesh`` following its components' plans.

    Every rank must hold the same full weights (same seed) and see the same batch. Under
    ``sequence_parallel`` the sequence length must be divisible by the tp size.
    """
    if tp_mesh.ndim != 1:
        raise TensorParallelError(f"tensor parallelism wants a 1-D mesh, got {tp_mesh.ndim} dimensions")
    entries = collect_tp_plans(model, sequence_parallel)  # all checks before anything changes
    for _, module, style in entries:
        parallelize_module(module, tp_mesh, style)
    for param in model.parameters():
        if isinstance(param, DTensor) and param.requires_grad:
            param.register_post_accumulate_grad_hook(_grad_like_param)


def _grad_like_param(param: torch.Tensor) -> None:
    """Give a gradient the placements of its parameter once it is accumulated.

    A replicated weight applied to sequence shards (SP norms) receives a Partial gradient: one all-reduce
    here (Megatron's reduction of sequence-parallel grads) instead of one inside every optimizer op and
    a surprise for code that reads ``.grad``. FSDP2 replaces the parameters and does this itself.
    """
    grad = param.grad
    if isinstance(grad, DTensor) and isinstance(param, DTensor) and grad.placements != param.placements:
        param.grad = grad.redistribute(param.device_mesh, param.placements)


# ------------------------------------------------------------------------------------------- styles

def sequence_scatter() -> PrepareModuleInput:
    """Full-sequence first argument -> this rank's sequence shard (a local slice; all-gather in backward)."""
    return PrepareModuleInput(
        input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), use_local_output=True
    )


def sequence_gather() -> PrepareModuleOutput:
    """Sequence-sharded output -> full sequence on every rank (all-gather; a local slice in backward)."""
    return PrepareModuleOutput(
        output_layouts=Shard(1), desired_output_layouts=Replicate(), use_local_output=True
    )


def _to_replicated_local(x: Any, mesh: DeviceMesh) -> Any:
    if isinstance(x, DTensor):
        return x.redistribute(mesh, [Replicate()]).to_local()
    return x


def _copy_to_tp(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """Megatron's "copy to tensor-parallel region": identity forward, all-reduce of the gradient in backward.

    A replicated input multiplied by this rank's columns only gets this rank's share of its gradient.
    """
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])


class ReplicatedParallel(ParallelStyle):
    """Parameters as Replicate DTensors, plain replicated tensors in and out.

    For modules (norms without sequence parallelism) that compute the same thing on every tp rank; their
    parameters still become DTensors on the tp mesh so FSDP2 and DCP treat all parameters alike.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def partition(name: str, mod: nn.Module, mesh: DeviceMesh) -> None:
            for p_name, param in list(mod.named_parameters(recurse=False)):
                if isinstance(param, DTensor):
                    continue
                replicated = DTensor.from_local(param.data, mesh, [Replicate()], run_check=False)
                mod.register_parameter(p_name, nn.Parameter(replicated, requires_grad=param.requires_grad))

        def inputs(mod: nn.Module, args: tuple[Any, ...], mesh: DeviceMesh) -> tuple[Any, ...]:
            return tuple(
                DTensor.from_local(a, mesh, [Replicate()], run_check=False)
                if isinstance(a, torch.Tensor) and not isinstance(a, DTensor)
                else a
                for a in args
            )

        def outputs(mod: nn.Module, out: Any, mesh: DeviceMesh) -> Any:
            return _to_replicated_local(out, mesh)

        return distribute_module(module, device_mesh, partition, inputs, outputs)


class _RegroupRows(torch.autograd.Function):
    """One all-to-all over tp that turns a contiguous row shard into this rank's rows of every block.

    Backward is the inverse all-to-all, which returns each row's gradient to the rank that stores it.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, local: torch.Tensor, perm: torch.Tensor, send: list[int], recv: list[int], group: Any
    ) -> torch.Tensor:
        ctx.perm, ctx.send, ctx.recv, ctx.group = perm, send, recv, group
        out = local.new_empty((sum(recv), *local.shape[1:]))
        collectives.all_to_all_single(out, local.index_select(0, perm).contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        back = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        collectives.all_to_all_single(back, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        local = grad.new_zeros((len(ctx.perm), *grad.shape[1:])).index_copy_(0, ctx.perm, back)
        return local, None, None, None, None


def _regroup_plan(rows: int, blocks: int, rank: int, size: int) -> tuple[torch.Tensor, list[int], list[int]]:
    """Which local rows go to which rank so that rank d ends with rows [k*B + d*B/size, ...) of each block k.

    Rank s stores global rows [s*L, (s+1)*L), L = rows / size; B = rows / blocks is one block (Q, K or V).
    Received pieces arrive ordered by source rank, i.e. in global order, which is block order.
    """
    per_rank, block = rows // size, rows // blocks
    owner = (torch.arange(rows) % block) // (block // size)  # the rank that computes global row g
    by_source = owner.view(size, per_rank)  # row s: owners of the rows rank s stores
    mine = by_source[rank]
    perm = torch.sort(mine, stable=True).indices  # grouped by destination, global order kept inside
    send = torch.bincount(mine, minlength=size).tolist()
    recv = (by_source == rank).sum(dim=1).tolist()
    return perm, send, recv


class PackedColwiseParallel(ParallelStyle):
    """Column parallelism for a Linear whose output stacks ``blocks`` equal blocks (W_pack: Q;K;V).

    A plain Shard(0) of the stacked [3h, h] weight would give rank 0 all of Q and part of K. The
    parameter stays a standard Shard(0) DTensor of the unchanged logical layout (so checkpoints, FSDP2,
    the optimizer and HF export see W_pack exactly as in one process); the forward regroups rows with
    one all-to-all so rank r multiplies by [Q_r; K_r; V_r], the rows of its own heads, and returns
    [b, s, 3h / tp] laid out as Q_r;K_r;V_r. The cost is an all-to-all of at most 2/3 of the local
    shard in forward and backward, traded for a checkpoint layout identical to the single-device one.
    Input: plain full-sequence tensor (or a DTensor, gathered to replicated).
    """

    def __init__(self, blocks: int = 3) -> None:
        super().__init__()
        self.blocks = blocks

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, nn.Linear):
            raise TensorParallelError(f"PackedColwiseParallel wants an nn.Linear, got {type(module).__name__}")
        rows, size = module.out_features, device_mesh.size()
        if rows % (self.blocks * size):
            raise TensorParallelError(
                f"tensor parallelism: {rows} packed output rows do not split into {self.blocks} blocks x tp={size}"
            )
        perm, send, recv = _regroup_plan(rows, self.blocks, device_mesh.get_local_rank(), size)
        group = device_mesh.get_group()
        for name, param in list(module.named_parameters(recurse=False)):
            dist_param = distribute_tensor(param.data, device_mesh, [Shard(0)], src_data_rank=self.src_data_rank)
            module.register_parameter(name, nn.Parameter(dist_param, requires_grad=param.requires_grad))

        def local_rows(t: torch.Tensor) -> torch.Tensor:
            local = t.to_local() if isinstance(t, DTensor) else t
            return _RegroupRows.apply(local, perm.to(local.device), send, recv, group)

        def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
            bias = None if self.bias is None else local_rows(self.bias[:, None])[:, 0]
            x = _copy_to_tp(_to_replicated_local(x, device_mesh), device_mesh)
            return F.linear(x, local_rows(self.weight), bias)

        module.forward = types.MethodType(forward, module)  # type: ignore[method-assign]
        return module


class VocabParallelEmbedding(ParallelStyle):
    """nn.Embedding sharded by vocabulary rows (Shard(0)), Megatron-style: each rank looks up the ids it
    owns, zeros the others, and the partial sums are all-reduced (or reduce-scattered to sequence shards
    under SP). Done on local tensors because DTensor's embedding backward for a row-sharded weight
    yields a replicated, full-vocabulary gradient; here the gradient stays a Shard(0) shard.
    Input: token ids, the same on every tp rank.
    """

    def __init__(self, output_layout: Shard | Replicate) -> None:
        super().__init__()
        self.output_layout = output_layout

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, nn.Embedding):
            raise TensorParallelError(f"VocabParallelEmbedding wants an nn.Embedding, got {type(module).__name__}")
        size = device_mesh.size()
        if module.num_embeddings % size:
            raise TensorParallelError(f"tensor parallelism: tp={size} does not divide vocabulary {module.num_embeddings}")
        rows = module.num_embeddings // size
        start = device_mesh.get_local_rank() * rows
        sharded = distribute_tensor(module.weight.data, device_mesh, [Shard(0)], src_data_rank=self.src_data_rank)
        module.weight = nn.Parameter(sharded, requires_grad=module.weight.requires_grad)
        layout = self.output_layout

        def forward(self: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
            ids = _to_replicated_local(ids, device_mesh)
            outside = (ids < start) | (ids >= start + rows)
            local = torch.where(outside, 0, ids - start)
            weight = self.weight.to_local() if isinstance(self.weight, DTensor) else self.weight
            pad = self.padding_idx
            out = F.embedding(local, weight, pad - start if pad is not None and start <= pad < start + rows else None)
            out = out.masked_fill(outside[..., None], 0.0)
            partial = DTensor.from_local(out, device_mesh, [Partial()], run_check=False)
            return partial.redistribute(device_mesh, [layout]).to_local()

        module.forward = types.MethodType(forward, module)  # type: ignore[method-assign]
        return module


class VocabParallelHead(ParallelStyle):
    """Output head sharded by vocabulary rows (Shard(0) of ``weight``); normalization stays row-local.

    Training never calls the head's forward (the vocabulary-parallel loss takes ``effective_weight()``,
    a Shard(0) DTensor); ``forward`` (generation, tests) returns full logits gathered over tp.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def partition(name: str, mod: nn.Module, mesh: DeviceMesh) -> None:
            if mod is not module:
                return
            for p_name, param in list(mod.named_parameters(recurse=False)):
                sharded = distribute_tensor(param.data, mesh, [Shard(0)], src_data_rank=self.src_data_rank)
                mod.register_parameter(p_name, nn.Parameter(sharded, requires_grad=param.requires_grad))

        def inputs(mod: nn.Module, args: tuple[Any, ...], mesh: DeviceMesh) -> tuple[Any, ...]:
            x = args[0]
            if isinstance(x, DTensor):
                x = x.redistribute(mesh, [Replicate()])
            else:
                x = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
            return (x, *args[1:])

        def outputs(mod: nn.Module, out: Any, mesh: DeviceMesh) -> Any:
            return _to_replicated_local(out, mesh)

        return distribute_module(module, device_mesh, partition, inputs, outputs)


class ShardHeads(ParallelStyle):
    """Tell a per-head module (ALiBi) which heads this rank owns: ``module.shard_heads(rank, size)``."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        shard = getattr(module, "shard_heads", None)
        if not callable(shard):
            raise TensorParallelError(f"ShardHeads: {type(module).__name__} has no shard_heads(rank, size)")
        shard(device_mesh.get_local_rank(), device_mesh.size())
        return module


# -------------------------------------------------------------------- plans of classes we do not own

def _transformer_plan(model: nn.Module, sequence_parallel: bool) -> TPPlan:
    """Vocabulary-parallel embedding; under SP, the part's ends convert between full and sharded sequences."""
    plan: TPPlan = {}
    stream = Shard(1) if sequence_parallel else Replicate()
    if getattr(model, "embed_tokens", None) is not None:
        plan["embed_tokens"] = VocabParallelEmbedding(stream)
    if sequence_parallel:
        layers = getattr(model, "layers", None)
        if getattr(model, "embed_tokens", None) is None and isinstance(layers, nn.ModuleDict) and len(layers):
            # A later pipeline stage receives full sequences; its first block takes this rank's shard.
            plan[f"layers.{next(iter(layers.keys()))}"] = PrepareModuleInput(
                input_layouts=(Replicate(), None, None, None),
                desired_input_layouts=(Shard(1), None, None, None),
                use_local_output=True,
            )
        plan[""] = sequence_gather()  # the final norm's (or last block's) shard -> full sequence
    return plan


def _attention_plan(sequence_parallel: bool) -> TPPlan:
    """Q;K;V column-parallel by heads, o_proj row-parallel; under SP the input is gathered first and the
    output reduce-scattered back to sequence shards."""
    plan: TPPlan = {
        "W_pack": PackedColwiseParallel(blocks=3),
        "o_proj": RowwiseParallel(output_layouts=Shard(1) if sequence_parallel else Replicate()),
    }
    if sequence_parallel:
        plan[""] = PrepareModuleInput(
            input_layouts=(Shard(1), None, None, None),
            desired_input_layouts=(Replicate(), None, None, None),
            use_local_output=True,
        )
    return plan
