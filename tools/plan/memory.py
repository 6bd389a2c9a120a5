"""Per-rank memory of a run: the terms, grouped by the moment of a step at which they are alive together.

A step has moments with different working sets, and the largest decides whether a layout fits:

- **loss forward**: every in-flight micro-batch's saved activations, the loss's kept gradients and its
  chunk buffers;
- **backward start**: the same with the head's own backward (NormHead's normalization) instead;
- **block backward**: with one micro-batch per step, block k's backward sees blocks 0..k still saved and
  the gradients of the blocks after it, so the peak is at the first or the last block, whichever holds
  more; plus the block's own working memory (its recomputation under full checkpointing, FSDP2's
  gathered blocks and gradient buffers);
- **reference forward** (DPO): the frozen reference's forward and full logits beside the policy's;
- **end of backward**: all gradients and the root unit's (embedding, head) gradient buffers;
- **optimizer step**: all gradients plus the optimizer's temporaries;
- **rollout** (RL): the KV cache of the decoded batch and the decoding buffers;
- **initialisation**: models are built on the meta device and cut there; each rank materialises its own
  shards, drawing one module's full tensors at a time (ZeRO-3 partitions them as they are drawn; ZeRO-1
  and -2 keep the whole trained model on every rank, so they build it whole).

With gradient accumulation or a pipeline, the gradients of earlier micro-batches are there throughout.
Persistent in every phase: the trained models' parameters and AdamW states, and the frozen models.
Backends: FSDP2 keeps fp32 master shards, fp32 gradient shards and fp32 AdamW shards (4 + 4 + 8 bytes per
local parameter), gathers bf16 copies of one block at a time (``parallel.fsdp_prefetch`` more in flight;
all of them between forward and backward without ``reshard_after_forward``) and the root for the whole
step; DeepSpeed ZeRO keeps bf16 parameters and gradients (partitioned from stages 3 and 2) and 12 bytes
of fp32 master + AdamW per parameter over the data-parallel size (on the host with the optimizer
offloaded), plus its reduce buckets (``deepspeed.reduce_bucket_size``, two with ``overlap_comm``) and
all-gather buckets. Frozen models keep fp32 weights, FSDP2-sharded over the data-parallel ranks under
either backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from haina.core.config import ConfigError, HainaConfig
from haina.core.parallel.mesh import Layout, resolve_layout
from haina.tools.plan import activations as act
from haina.tools.plan.algorithms import ALIGNMENT, Role, Workload, workload
from haina.tools.plan.gpus import GIB, Target
from haina.tools.plan.params import (
    RankParams,
    largest_full_tensor,
    largest_param,
    rank_params,
    total_parameters,
)


@dataclass(frozen=True)
class Term:
    name: str
    bytes: float
    note: str = ""


@dataclass
class Phase:
    name: str
    terms: list[Term]

    @property
    def total(self) -> float:
        return sum(t.bytes for t in self.terms)


@dataclass
class RankMemory:
    """One pipeline rank (every rank of a stage is alike up to FSDP2's padding of uneven shards)."""

    pp_rank: int
    trained_parameters: int  # this rank's local share of the trained models' parameters
    frozen_parameters: int
    phases: list[Phase]
    host: list[Term] = field(default_factory=list)

    @property
    def peak(self) -> Phase:
        return max(self.phases, key=lambda p: p.total)


@dataclass
class MemoryPlan:
    """The per-rank memory of ``workload`` on ``layout``, and whether it fits ``target``."""

    layout: Layout
    target: Target
    workload: Workload
    ranks: list[RankMemory]
    reserve_bytes: float
    fragmentation: float
    notes: list[str] = field(default_factory=list)

    @property
    def worst(self) -> RankMemory:
        return max(self.ranks, key=lambda r: r.peak.total)

    @property
    def tensors_bytes(self) -> float:
        """The peak of tensor memory on the worst rank (what ``torch.cuda.max_memory_allocated`` reports)."""
        return self.worst.peak.total

    @property
    def needed_bytes(self) -> float:
        """Tensors, the allocator's fragmentation over them, and the runtime reserve (context, NCCL)."""
        return self.tensors_bytes * (1 + self.fragmentation) + self.reserve_bytes

    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.target.memory_bytes

    def verdict(self) -> str:
        need, have = self.needed_bytes / GIB, self.target.memory_gib
        if not math.isfinite(have):
            return f"needs {need:.1f} GiB per rank"
        if self.fits:
            return f"fits: {need:.1f} of {have:.1f} GiB per rank ({have - need:.1f} GiB free)"
        return f"does not fit: needs {need:.1f} GiB per rank, {need - have:.1f} over {have:.1f} GiB"


@dataclass(frozen=True)
class Dtypes:
    """Bytes per element: ``compute`` (matmuls), ``stream`` (activations between blocks), ``gathered``
    (parameters as FSDP2/DeepSpeed hand them to the forward), ``head`` (the head weight the loss reads)."""

    compute: int
    stream: int
    gathered: int
    head: int
    cast_weights: bool


def dtypes_of(cfg: HainaConfig, layout: Layout) -> Dtypes:
    bf16 = cfg.train.precision == "bf16"
    compute = 2 if bf16 else 4
    sharded = cfg.parallel.dp_backend == "deepspeed" or layout.dp > 1
    if sharded:  # FSDP2's mixed precision gathers bf16; DeepSpeed casts the module to bf16
        return Dtypes(compute, compute, compute, compute, False)
    return Dtypes(compute, 4, 4, 4, bf16)  # fp32 parameters under autocast: weights cast per forward


def _check_layout(cfg: HainaConfig, algorithm: str) -> None:
    """The alignment algorithms' own layout refusals (haina.plugins.align.common.check_layout)."""
    if algorithm not in ALIGNMENT:
        return
    if cfg.parallel.pp > 1:
        raise ConfigError(f"parallel.pp: the {algorithm} algorithm runs without pipeline parallelism (pp=1)")
    if cfg.parallel.tp > 1 and cfg.parallel.sequence_parallel:
        raise ConfigError(
            f"parallel.sequence_parallel: the {algorithm} algorithm runs tp without sequence parallelism (set it false)"
        )


def in_flight(layout: Layout, pp_rank: int, schedule: str, virtual: int) -> int:
    """Stage forwards whose activations a pipeline rank holds at once (torch.distributed.pipelining's
    warm-up: 1F1B ``min(M, pp - rank)`` micro-batches; interleaved ``(v - 1) pp + 2 (pp - 1 - rank) + 1``
    model chunks, at most ``M v``)."""
    m = layout.grad_accum
    if layout.pp == 1:
        return 1
    if schedule == "interleaved_1f1b" and virtual > 1:
        return min((virtual - 1) * layout.pp + 2 * (layout.pp - 1 - pp_rank) + 1, m * virtual)
    return min(m, layout.pp - pp_rank)


def _micro(role: Role, w: Workload, layout: Layout, cfg: HainaConfig, d: Dtypes, device: str, rows: int) -> act.Micro:
    sp = cfg.parallel.sequence_parallel and layout.tp > 1
    return act.Micro(role.model, rows, w.seq, layout.tp, sp, d.stream, d.compute, device, d.cast_weights, w.segments)


def plan_memory(cfg: HainaConfig, nproc: int, target: Target, algorithm: str | None = None,
                reserve_gib: float = 2.0, fragmentation: float = 0.05) -> MemoryPlan:
    """Per-rank memory of ``cfg`` (``algorithm``, default the config's) on ``nproc`` ranks of ``target``."""
    layout = resolve_layout(cfg, nproc)
    name = algorithm or cfg.algorithm
    _check_layout(cfg, name)
    w = workload(cfg, layout, name)
    d = dtypes_of(cfg, layout)
    device = target.device_type
    ranks = [_rank(cfg, layout, w, d, device, r) for r in range(layout.pp)]
    on_gpu = device == "cuda"
    notes = list(w.notes)
    if cfg.parallel.activation_checkpoint == "selective":
        notes.append("selective: the attention kernels keep no [heads, seq, seq] scores here, so recomputing them "
                     "saves only their log-sum-exp (use full to cut activations)")
    if w.loss == "full_logits":
        notes.append("dpo: the policy and the reference compute full [rows, seq, vocab] logits (no chunking)")
    if any(r.peak.name == "initialisation" for r in ranks):
        whole_build = cfg.parallel.dp_backend == "deepspeed" and cfg.deepspeed.zero_stage < 3
        notes.append("the peak is the model build: ZeRO-1/2 build the whole fp32 model on every rank" if whole_build
                     else "the peak is the model build: each rank's shards plus one module drawn at full size")
    return MemoryPlan(layout, target, w, ranks, reserve_gib * GIB if on_gpu else 0.0,
                      fragmentation if on_gpu else 0.0, notes)


def _params(cfg: HainaConfig, layout: Layout, role: Role, pp_rank: int, frozen: bool = False) -> RankParams:
    """A role's parameters on this rank: FSDP2 shards under the fsdp2 backend, and frozen models under
    either backend (DeepSpeed partitions only what it trains)."""
    p = cfg.parallel
    virtual = p.pp_virtual_stages if p.pp_schedule == "interleaved_1f1b" else 1
    fsdp = p.dp_backend == "fsdp2" or frozen
    return rank_params(role.model, layout, pp_rank, virtual, p.pp_stage_layers, fsdp=fsdp)


def _rank(cfg: HainaConfig, layout: Layout, w: Workload, d: Dtypes, device: str, pp_rank: int) -> RankMemory:
    p = cfg.parallel
    deepspeed = p.dp_backend == "deepspeed"
    fsdp = not deepspeed and layout.dp > 1
    trained = [(r, _params(cfg, layout, r, pp_rank)) for r in w.trained]
    frozen = [(r, _params(cfg, layout, r, pp_rank, frozen=True)) for r in w.frozen]
    local_trained = sum(rp.local for _, rp in trained)
    local_frozen = sum(rp.local for _, rp in frozen)
    whole = 4 * sum(total_parameters(r.model) for r, _ in trained)
    host: list[Term] = []

    # ---------------------------------------------------------------------------- persistent state
    static: list[Term] = []
    grads: list[Term] = []
    opt_temp: list[Term] = []
    if deepspeed:
        ds = cfg.deepspeed
        n = layout.dp
        full = local_trained  # rank_params(fsdp=False): the whole model
        part = math.ceil(full / n)
        e = d.gathered
        static.append(Term("parameters", e * (part if ds.zero_stage == 3 else full),
                           f"{'bf16' if e == 2 else 'fp32'}, {'partitioned' if ds.zero_stage == 3 else 'whole'} (ZeRO-{ds.zero_stage})"))
        states = [Term("fp32 master weights", 4 * part, f"partitioned over dp={n}"),
                  Term("AdamW states", 8 * part, f"fp32 exp_avg + exp_avg_sq, partitioned over dp={n}")]
        if ds.offload_optimizer:
            host += states
        else:
            static += states
        grads.append(Term("gradients", e * (full if ds.zero_stage == 1 else part),
                          "whole until reduced (ZeRO-1)" if ds.zero_stage == 1 else f"partitioned over dp={n}"))
        reduce, overlap = ds.zero_setting("reduce_bucket_size"), ds.zero_setting("overlap_comm")
        gather = ds.zero_setting("allgather_bucket_size")
        static.append(Term("ZeRO reduce buckets", e * reduce * (2 if overlap else 1),
                           f"reduce_bucket_size {reduce:.3g} x{2 if overlap else 1}{' (overlap_comm)' if overlap else ''}"))
        opt_temp.append(Term("fp32 gradient partition", 4 * part, "the step's fp32 copy of the reduced gradients"))
        if ds.zero_stage < 3:
            opt_temp.append(Term("ZeRO all-gather bucket", e * min(gather, full), f"allgather_bucket_size {gather:.3g}"))
        if frozen:
            static.append(Term("frozen models", 4 * local_frozen,
                               f"fp32, FSDP2-sharded over dp={n}: {', '.join(r.name for r, _ in frozen)}"))
    else:
        sharded = f"sharded over dp_shard={layout.dp_shard}" if fsdp else "not sharded (no data parallelism)"
        static.append(Term("parameters", 4 * local_trained, f"fp32 master, {sharded}"))
        static.append(Term("AdamW states", 8 * local_trained, f"fp32 exp_avg + exp_avg_sq, {sharded}"))
        grads.append(Term("gradients", 4 * local_trained, f"fp32, {sharded}"))
        if frozen:
            static.append(Term("frozen models", 4 * local_frozen,
                               f"fp32, {sharded}: {', '.join(r.name for r, _ in frozen)}"))
        if device != "cuda" and (fsdp or layout.tp > 1):
            # DTensor parameters on CPU take torch's per-tensor AdamW: sqrt and divide make two temporaries
            largest = max(largest_param(r.model, layout, fsdp) for r, _ in trained)
            opt_temp.append(Term("AdamW temporaries", 8 * largest, "per-tensor step on CPU (largest shard x2)"))

    # -------------------------------------------------------------------------- one micro-batch
    last_stage = pp_rank == layout.pp - 1
    virtual = p.pp_virtual_stages if p.pp_schedule == "interleaved_1f1b" else 1
    flights = in_flight(layout, pp_rank, p.pp_schedule, virtual)
    mode = p.activation_checkpoint
    # gradients of earlier micro-batches are there from the start of backward (accumulation, pipelines);
    # with one micro-batch they grow block by block while the activations are freed
    accumulating = layout.pp > 1 or (layout.grad_accum > 1 and w.step_rows == 0)
    grad_per_byte = (d.gathered if deepspeed else 4)  # bytes of a stored gradient element
    saved = loss_state = loss_transient = head_backward = 0.0
    block_peak = 0.0  # the largest live set inside backward: activations left, gradients so far, a block's work
    gathered = pipeline_buffers = 0.0
    block_note = ""
    for role, rp in trained:
        micro = _micro(role, w, layout, cfg, d, device, w.rows)
        block_tp = rp.block.tp_local
        per_block = act.block_saved(micro, block_tp, mode)
        chunk_blocks = max(len(s) for s in rp.stages)
        fixed = act.forward_fixed(micro, last_stage, mode)
        saved_role = flights * chunk_blocks * per_block + fixed
        if layout.pp > 1:  # stage outputs kept until their backward, and the per-micro-batch p2p buffers
            row_bytes = d.stream * micro.tokens * role.model.hidden_size
            saved_role += 0 if last_stage else flights * row_bytes
            pipeline_buffers += layout.grad_accum * row_bytes * sum(
                (idx != 0) + (idx != layout.pp * virtual - 1) for idx in _stage_indices(pp_rank, layout.pp, virtual))
        saved += saved_role
        work = act.block_working(micro)
        notes = ["gradients of its intermediates"]
        if mode == "full":
            work += act.block_saved(micro, block_tp, "none")
            notes.append("its recomputed activations")
        if fsdp:
            gathered += d.gathered * rp.root.tp_local
            live = 1 + max(1, p.fsdp_prefetch)
            if p.reshard_after_forward:
                work += live * d.gathered * block_tp
                notes.append(f"{live} blocks gathered")
            else:
                gathered += d.gathered * rp.blocks * block_tp
            work += (d.gathered + 4) * block_tp + 4 * rp.block.local
            notes.append("unsharded gradients and reduce-scatter input (FSDP2)")
        block_note = ", ".join(notes)
        if accumulating:
            block_peak += saved_role + work
        else:  # backward of block k: blocks 0..k still saved, blocks after k already have gradients
            grad_block = grad_per_byte * (rp.block.local if not deepspeed else _ds_block_grad(cfg, layout, rp))
            n = flights * chunk_blocks
            head_grad = (d.gathered if fsdp else 4) * _head_tp(role, layout) if last_stage else 0.0
            block_peak += fixed + head_grad + max(n * per_block, per_block + (n - 1) * grad_block) + work
        if last_stage:
            loss = _loss(w, micro, cfg, d, role)
            loss_state += loss.state
            loss_transient += loss.transient
            head_backward += loss.backward
    frozen_forward = 0.0
    for role, rp in frozen:
        if w.loss != "full_logits":
            continue  # RL's frozen models run in the rollout phase
        micro = _micro(role, w, layout, cfg, d, device, w.rows)
        fwd = act.block_working(micro) + act.full_logits_loss(micro).transient
        if layout.dp > 1:  # frozen models are FSDP2-sharded under either backend
            fwd += d.gathered * (rp.root.tp_local + 2 * rp.block.tp_local)
        elif deepspeed or d.cast_weights:
            fwd += d.compute * rp.block.tp_local  # one block's weights cast at a time
        frozen_forward = max(frozen_forward, fwd)

    base = [*static, *(grads if accumulating else [])]
    if deepspeed and cfg.deepspeed.zero_stage == 3:
        # DeepSpeed releases a gathered parameter only past stage3_max_live_parameters (or when its next use
        # is farther than stage3_max_reuse_distance, also 1e9 by default): a model under that stays whole
        live = cfg.deepspeed.zero_setting("stage3_max_live_parameters")
        whole_model = sum(rp.local for _, rp in trained)  # rank_params(fsdp=False): whole
        blocks = 2 * max(rp.block.tp_local for _, rp in trained)
        base.append(Term("ZeRO-3 gathered", d.gathered * max(blocks, min(whole_model, live)),
                         f"whole parameters kept gathered: up to stage3_max_live_parameters {live:.3g} of "
                         f"{whole_model:.3g} (at least the running block and the next)"))
    if gathered:
        base.append(Term("FSDP2 gathered", gathered,
                         "root (embedding, norm, head)" + ("" if p.reshard_after_forward else " and every block (no reshard)")))
    if pipeline_buffers:
        base.append(Term("pipeline p2p buffers", pipeline_buffers, f"{layout.grad_accum} micro-batches' receive buffers"))
    acts = Term("activations", saved, f"{mode} checkpointing, {flights} in flight, {w.rows} rows x {w.seq}")
    kept = Term("loss state", loss_state, {
        "full_logits": "the full logits' log-softmax, kept for backward",
        "logps": "hidden states and head weight the log-probs keep for backward",
        "value": "(a value head: nothing to speak of)",
    }.get(w.loss, "d(loss)/d(hidden) and d(loss)/d(head), computed in the forward, kept for backward"))
    shape = f"{w.rows} rows x {w.seq}"
    phases = [Phase("loss forward", [*base, acts, kept, Term("loss buffers", loss_transient,
                                                               "the chunk's logits and the head's casts")])]
    if head_backward:
        phases.append(Phase("backward start", [*base, acts, kept, Term(
            "head backward", head_backward,
            "NormHead's normalization backward: four fp32 [vocab/tp, hidden] temporaries" if w.loss != "full_logits"
            else "the full logits' gradient, then NormHead's normalization backward")]))
    phases.append(Phase("block backward", [*base, Term(
        "activations + gradients", block_peak,
        f"{mode} checkpointing, {shape}: saved activations left, gradients so far, one block's backward "
        f"({block_note})" if not accumulating else f"{mode} checkpointing, {flights} in flight, {shape}, and one "
        f"block's backward ({block_note})")]))
    if frozen_forward:
        phases.append(Phase("reference forward", [*base, acts, kept, Term(
            "frozen forward", frozen_forward, "the reference's forward and full logits, beside the policy's")]))

    end = [*static, *grads]
    root_work = 0.0
    if fsdp:
        root_work = sum((d.gathered + 4) * rp.root.tp_local + d.gathered * rp.root.tp_local for _, rp in trained)
    if root_work:
        end.append(Term("FSDP2 root gradients", root_work, "embedding and head: unsharded grads + reduce-scatter input"))
    phases.append(Phase("end of backward", end))
    phases.append(Phase("optimizer step", [*static, *grads, *opt_temp]))

    if w.step_rows:
        phases.append(Phase("rollout", [*static, *_rollout(cfg, layout, w, d, device, trained, frozen, fsdp)]))
    drawn = max(largest_full_tensor(r.model, embed=pp_rank == 0, head=last_stage) for r, _ in [*trained, *frozen])
    phases.append(Phase("initialisation", _initialisation(static, whole, drawn, d, deepspeed, cfg.deepspeed.zero_stage)))
    stored = local_trained
    if deepspeed and cfg.deepspeed.zero_stage == 3:
        stored = math.ceil(local_trained / layout.dp)
    return RankMemory(pp_rank, stored, local_frozen, phases, host)


def _initialisation(static: list[Term], whole: float, drawn: int, d: Dtypes, deepspeed: bool,
                    cfg_stage: int = 2) -> list[Term]:
    """Building the models. Under FSDP2, tp and pp they are built on the meta device and cut there; each
    rank then materialises its shards of the trained model and of each frozen one, drawing one module at
    full size at a time and keeping its slice (:mod:`haina.core.materialize`). ZeRO-3 does the same with
    its partitions (the drawn module cast to bf16 before partitioning in a bf16 run); ZeRO-1 and -2 keep
    the whole trained model on every rank, so they get it whole in fp32."""
    if deepspeed and cfg_stage == 3:
        held = [t for t in static if t.name in ("parameters", "frozen models")]
        drawn_bytes = (4 + (2 if d.gathered == 2 else 0)) * drawn
        return [*held, Term("one module at full size", drawn_bytes,
                            "fp32 drawn whole (and its bf16 cast), then partitioned (ZeRO-3)")]
    if deepspeed:
        built = Term("whole model at build", whole, "fp32, on every rank, before ZeRO partitions it")
        # deepspeed.initialize casts a bf16 run's model in place (the fp32 copy goes as the bf16 one comes),
        # then ZeRO-1/2 copy the parameters into one flat buffer: 2 + 2 bytes per parameter under bf16, no
        # more than the fp32 build; an fp32 run's flat copy comes on top.
        if cfg_stage < 3 and d.gathered == 4:
            return [built, Term("ZeRO flattening", whole, "flat fp32 copy of the parameters (ZeRO-1/2)")]
        return [built]
    held = [t for t in static if t.name in ("parameters", "frozen models")]
    return [*held, Term("one module at full size", 4 * drawn, "fp32, drawn whole, then this rank's slice kept")]


def _head_tp(role: Role, layout: Layout) -> float:
    """Elements of this rank's head weight (tensor-parallel rows)."""
    from haina.tools.plan.params import model_shapes

    return sum(math.prod(shape) / (layout.tp if dim is not None else 1) for shape, dim in model_shapes(role.model).head)


def _ds_block_grad(cfg: HainaConfig, layout: Layout, rp: RankParams) -> float:
    """Gradient elements a DeepSpeed rank stores per block: whole under ZeRO-1, partitioned from ZeRO-2."""
    return rp.block.full if cfg.deepspeed.zero_stage == 1 else rp.block.full / layout.dp


def _stage_indices(pp_rank: int, pp: int, virtual: int) -> list[int]:
    from haina.core.parallel.pipeline import stage_indices

    return stage_indices(pp_rank, pp, virtual)


def _loss(w: Workload, micro: act.Micro, cfg: HainaConfig, d: Dtypes, role: Role) -> act.LossMemory:
    if role.model.head == "value":
        return act.LossMemory(0.0, 0.0)
    if w.loss == "chunked_lm":
        return act.chunked_lm_loss(micro, cfg.loss.chunk_size, d.head)
    if w.loss == "full_logits":
        return act.full_logits_loss(micro, d.head)
    if w.loss == "logps":
        return act.chunked_logps(micro, cfg.loss.chunk_size, d.head)
    return act.LossMemory(0.0, 0.0)


def _rollout(cfg: HainaConfig, layout: Layout, w: Workload, d: Dtypes, device: str,
             trained: list[tuple[Role, RankParams]], frozen: list[tuple[Role, RankParams]], fsdp: bool) -> list[Term]:
    """Decoding the rollout batch: the actor's KV cache, one block's prefill, the last-position logits and
    the repetition-penalty mask; the frozen models then score it without gradients."""
    actor, rp = trained[0]
    m = actor.model
    rows, length = w.rollout_rows, w.kv_len
    kv = 2 * rp.blocks * rows * (m.num_heads / layout.tp) * length * m.head_dim * d.compute
    h, f, t, e = m.hidden_size, m.ffn_size, layout.tp, d.compute
    prefill = e * rows * length * (3 * h / t + 3 * f / t + 2 * h)
    gathered = d.gathered * (rp.root.tp_local + 2 * rp.block.tp_local) if fsdp else (
        d.compute * rp.block.tp_local if d.cast_weights else 0)
    vocab = rows * m.vocab_size * (4 + 1)  # fp32 logits of the last position, the bool seen-token mask
    scoring = max((act.chunked_logps(_micro(r, w, layout, cfg, d, device, rows), cfg.loss.chunk_size, d.head).transient
                   for r, _ in [*trained, *frozen] if r.model.head != "value"), default=0.0)
    return [Term("KV cache", kv, f"{rows} rows x {length} positions, {m.num_heads // layout.tp} heads per rank"),
            Term("decoding buffers", prefill + gathered + vocab, "prefill of one block, gathered weights, logits"),
            Term("scoring (no grad)", scoring, "chunked log-probs of the actor and the reference")]
