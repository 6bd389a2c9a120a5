"""``haina plan``: per-rank parameters agree with the simulated layout and the model, sharding divides the
optimizer states, checkpointing orders the activations, the alignment algorithms add their models, the
verdict says by how much, and bad input is one line with exit status 2. The measured-peak comparison is a
benchmark (``python -m haina.tools.bench.plan_check``), not a test: it trains."""

from __future__ import annotations

import json
import math

import pytest
import torch

from haina.core.config import load_config
from haina.core.model import Transformer, count_parameters
from haina.core.parallel.mesh import resolve_layout
from haina.tools.plan.gpus import CPU, GIB, gpu
from haina.tools.plan.memory import plan_memory
from haina.tools.plan.params import rank_params, total_parameters
from tests.conftest import one_line_error

SMALL = ["model.hidden_size=128", "model.num_heads=4", "model.num_layers=4", "model.vocab_size=1024",
         "train.seq_len=128", "model.max_seq_len=128", "model.attention=sdpa"]


def _term(plan, name: str, phase: str | None = None) -> float:  # noqa: ANN001
    phases = plan.worst.phases if phase is None else [p for p in plan.worst.phases if p.name == phase]
    return next(t.bytes for p in phases for t in p.terms if t.name == name)


def test_parameters_per_rank_are_what_simulate_lays_out() -> None:
    """A 2 x 2 x 2 layout (pp, dp_shard, tp) with an odd layer split: the planner's local count on every
    pipeline rank equals the sum of the largest local shards simulate finds on the fake 8-rank world."""
    from haina.tools.simulate import simulate

    overrides = [*SMALL, "model.num_layers=5", "parallel.tp=2", "parallel.pp=2", "parallel.dp_shard=2",
                 "train.global_batch_size=8"]
    cfg = load_config("tiny", overrides)
    report = simulate(cfg, 8)
    simulated: dict[int, int] = {}
    for stage in report["stages"]:
        simulated[stage["pp_rank"]] = simulated.get(stage["pp_rank"], 0) + stage["largest_local_shard_sum"]
    layout = resolve_layout(cfg, 8)
    planned = {r: rank_params(cfg.model, layout, r).local for r in range(2)}
    assert planned == simulated and planned[0] != planned[1]
    plan = plan_memory(cfg, 8, CPU)
    assert {r.pp_rank: r.trained_parameters for r in plan.ranks} == simulated


def test_one_rank_holds_the_whole_model() -> None:
    cfg = load_config("tiny", [*SMALL, "model.head=linear"])
    with torch.device("meta"):
        model = Transformer(cfg.model)
    assert rank_params(cfg.model, resolve_layout(cfg, 1)).local == count_parameters(model) == total_parameters(cfg.model)


def test_sharding_divides_the_optimizer_states() -> None:
    """FSDP2 over dp_shard=4 and DeepSpeed ZeRO over dp=4 keep a quarter of the AdamW states (up to the
    padding of uneven shards); HSDP shards over dp_shard only."""
    cfg = load_config("tiny", SMALL)
    whole = _term(plan_memory(cfg, 1, CPU), "AdamW states")
    assert whole == 8 * total_parameters(cfg.model)
    fsdp = _term(plan_memory(cfg, 4, CPU), "AdamW states")
    assert whole / 4 <= fsdp <= 1.01 * whole / 4
    hsdp = _term(plan_memory(load_config("tiny", [*SMALL, "parallel.dp_replicate=2"]), 4, CPU), "AdamW states")
    assert whole / 2 <= hsdp <= 1.01 * whole / 2
    ds = plan_memory(load_config("tiny", [*SMALL, "parallel.dp_backend=deepspeed"]), 4, CPU)
    assert _term(ds, "AdamW states") == 8 * math.ceil(total_parameters(cfg.model) / 4)
    offload = plan_memory(load_config("tiny", [*SMALL, "parallel.dp_backend=deepspeed",
                                               "deepspeed.offload_optimizer=true"]), 4, CPU)
    assert "AdamW states" in {t.name for t in offload.worst.host}
    assert offload.tensors_bytes < ds.tensors_bytes


@pytest.mark.parametrize("target", ["cpu", "h100-80gb"])
def test_checkpointing_orders_the_activations(target: str) -> None:
    """full < selective < none; with the fused kernels selective buys only the kernel's log-sum-exp."""
    saved = {}
    for mode in ("none", "selective", "full"):
        plan = plan_memory(load_config("tiny", [*SMALL, "train.precision=bf16",
                                                f"parallel.activation_checkpoint={mode}"]), 1, gpu(target))
        saved[mode] = _term(plan, "activations", "loss forward")
    assert saved["full"] < saved["selective"] < saved["none"]
    assert saved["none"] - saved["selective"] < 0.05 * saved["none"]
    assert saved["full"] < 0.2 * saved["none"]


def test_alignment_algorithms_add_their_models() -> None:
    """PPO (actor and critic trained, reference and reward model frozen) needs more than SFT; DPO adds
    its frozen reference; the alignment algorithms refuse pipelines like the runs do."""
    cfg = load_config("tiny", [*SMALL, "parallel.sequence_parallel=false"])
    plans = {a: plan_memory(cfg, 2, gpu("h100-80gb"), a) for a in ("sft", "dpo", "ppo")}
    assert plans["ppo"].tensors_bytes > plans["sft"].tensors_bytes
    names = [(r.name, r.trained) for r in plans["ppo"].workload.roles]
    assert names == [("actor", True), ("critic", True), ("reference", False), ("reward model", False)]
    assert plans["sft"].worst.frozen_parameters == 0 < plans["dpo"].worst.frozen_parameters
    assert plans["ppo"].worst.trained_parameters > plans["sft"].worst.trained_parameters
    from haina.core.errors import ConfigError

    with pytest.raises(ConfigError, match="pipeline"):
        plan_memory(load_config("tiny", [*SMALL, "parallel.pp=2", "train.global_batch_size=4"]), 2, CPU, "ppo")


def test_fsdp_prefetch_and_deepspeed_buckets_are_accounted() -> None:
    base = [*SMALL, "train.precision=bf16"]
    one, three = (plan_memory(load_config("tiny", [*base, f"parallel.fsdp_prefetch={n}"]), 2, gpu("h100-80gb"))
                  for n in (1, 3))
    assert _term(three, "activations + gradients") > _term(one, "activations + gradients")
    ds = [*base, "parallel.dp_backend=deepspeed"]
    small, overlap = (plan_memory(load_config("tiny", [*ds, *extra]), 2, gpu("h100-80gb")) for extra in (
        ["deepspeed.reduce_bucket_size=1000000"], ["deepspeed.reduce_bucket_size=1000000", "deepspeed.overlap_comm=true"]))
    assert _term(small, "ZeRO reduce buckets") == 2 * 1_000_000 and _term(overlap, "ZeRO reduce buckets") == 4 * 1_000_000


def test_deepspeed_settings_reach_its_config() -> None:
    from haina.core.parallel.zero import deepspeed_config

    cfg = load_config("tiny", ["parallel.dp_backend=deepspeed", "deepspeed.reduce_bucket_size=3000000",
                               "deepspeed.overlap_comm=true"])
    zero = deepspeed_config(cfg, resolve_layout(cfg, 2))["zero_optimization"]
    assert zero["reduce_bucket_size"] == 3_000_000 and zero["overlap_comm"] is True
    assert "allgather_bucket_size" not in zero  # unset: DeepSpeed's own default
    assert cfg.deepspeed.zero_setting("allgather_bucket_size") == 500_000_000
    message = one_line_error(load_config, "tiny", ["deepspeed.overlap_comm=false",
                                                   "deepspeed.config={zero_optimization: {overlap_comm: true}}"])
    assert "deepspeed.overlap_comm" in message


def _prefetch_check() -> None:
    """In a fresh process (the fake two-rank group must be this process's only one)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from haina.core.model import blocks_of
    from haina.core.parallel.data_parallel import apply_fsdp

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    with torch.device("meta"):
        model = Transformer(load_config("tiny", SMALL).model)
    apply_fsdp(model, init_device_mesh("cpu", (2,), mesh_dim_names=("dp_shard",)), bf16=True,
               reshard_after_forward=True, prefetch=2)
    states = [b._get_fsdp_state() for b in blocks_of(model)]
    assert states[0]._states_to_forward_prefetch == states[1:3]
    assert states[3]._states_to_backward_prefetch == [states[2], states[1]]
    assert states[3]._states_to_forward_prefetch == []
    dist.destroy_process_group()


def test_fsdp_prefetch_is_set_on_the_blocks() -> None:
    """``parallel.fsdp_prefetch=2`` gives each block the next two (forward) and previous two (backward);
    checked in a process of its own, so it runs whatever group this one already has."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "from tests.test_plan import _prefetch_check; _prefetch_check()"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_verdict_says_by_how_much() -> None:
    cfg = load_config("baichuan2-7b", ["parallel.sequence_parallel=false"])
    fits = plan_memory(cfg, 8, gpu("h100-80gb"))
    need = fits.needed_bytes / GIB
    assert fits.fits and fits.verdict() == f"fits: {need:.1f} of {81559 / 1024:.1f} GiB per rank ({81559 / 1024 - need:.1f} GiB free)"
    tight = plan_memory(cfg, 8, gpu("a100-40gb"))
    assert not tight.fits and tight.verdict().startswith("does not fit: needs ")
    assert tight.verdict().endswith(f"{tight.needed_bytes / GIB - 40:.1f} over 40.0 GiB")


def test_cli_json_and_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    """The JSON plan (with the layouts that fit) and bad input, each exit 2 with one line on stderr."""
    from haina.tools.cli import run

    assert run(["plan", "--config", "baichuan2-7b", "--nproc", "8", "--gpu", "a100-40gb", "--json",
                "parallel.sequence_parallel=false"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {"algorithm", "layout", "gpu", "ranks", "phases", "needed_gib", "fits", "verdict", "flops_per_step",
            "step_s", "tokens_per_s", "fitting_layouts", "notes"} <= set(plan)
    assert plan["fits"] is False and plan["verdict"].startswith("does not fit")
    assert plan["gpu"] == {"name": "a100-40gb", "memory_gib": 40.0, "peak_tflops": 312.0}
    assert plan["layout"]["dp_shard"] == 8 and plan["step_s"] > 0 and plan["fitting_layouts"]
    for alt in plan["fitting_layouts"]:
        assert alt["needed_gib"] <= 40.0 and all("=" in o for o in alt["overrides"])
    for bad, expected in ((["--nproc", "8", "--gpu", "h999"], "unknown device"),
                          (["--nproc", "6", "--gpu", "h200", "parallel.tp=4"], "does not divide the world size 6")):
        assert run(["plan", "--config", "tiny", *bad]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], lines
