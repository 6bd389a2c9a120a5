"""Models built on the meta device and materialised as shards (haina.core.materialize).

The claims: every rank's shards hold exactly its slice of the one-process model's initial weights, for
any layout (checked rank by rank on a fake 8-rank world: tp=2 x pp=2 x dp_shard=2, in real CPU memory);
a rank never holds more than its shards plus one module's full tensors while doing it; and a module that
holds state but cannot fill it is refused in one line.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from haina.core.config import load_config
from haina.core.errors import PluginError
from haina.core.materialize import init_key, materialize, materialize_each
from haina.core.model import META, Transformer, build_model

WORKER = r"""
import json, sys
import torch, torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.profiler import ProfilerActivity, profile

from haina.core.algorithm import algorithm_class
from haina.core.config import load_config
from haina.core.model import META, build_model
from haina.core.parallel.mesh import build_mesh, resolve_layout
from haina.core.placement import lay_out
from haina.tools.bench.plan_check import allocations, live_peak

overrides, ranks = json.loads(sys.argv[1]), json.loads(sys.argv[2])
cfg = load_config("tiny", overrides)
whole = dict(build_model(cfg, torch.device("cpu")).named_parameters())
largest_full = max(p.numel() * 4 for p in whole.values())
out = []
for rank in ranks:
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=8)
    layout = resolve_layout(cfg, 8)
    mesh = build_mesh(layout, "cpu")
    model = build_model(cfg, META)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        parts, _ = lay_out(model, cfg, layout, mesh, torch.device("cpu"), stage_loss=algorithm_class(cfg)(cfg))
    peak, _, _ = live_peak(allocations(prof))
    local_bytes, wrong, names = 0, [], []
    for part in parts:
        for name, p in part.named_parameters():
            names.append(name)
            if isinstance(p, DTensor):
                expected = distribute_tensor(whole[name], p.device_mesh, p.placements, src_data_rank=None).to_local()
                local = p.to_local()
            else:
                expected, local = whole[name], p
            local_bytes += local.numel() * local.element_size()
            if local.shape != expected.shape or not torch.equal(local, expected):
                wrong.append(name)
    # a frozen model (a reference) with no stage loss and no pipeline: cut by the same tp x dp layout
    frozen_cfg = load_config("tiny", [o for o in overrides if not o.startswith(("parallel.pp", "parallel.dp_shard"))]
                             + ["parallel.pp=1", "parallel.dp_shard=4"])
    frozen_layout = resolve_layout(frozen_cfg, 8)
    (frozen,), _ = lay_out(build_model(frozen_cfg, META), frozen_cfg, frozen_layout, build_mesh(frozen_layout, "cpu"),
                           torch.device("cpu"), frozen=True)
    frozen_wrong = [n for n, p in frozen.named_parameters() if not isinstance(p, DTensor) or p.requires_grad
                    or not torch.equal(p.to_local(), distribute_tensor(whole[n], p.device_mesh, p.placements,
                                                                       src_data_rank=None).to_local())]
    frozen_bytes = sum(p.to_local().numel() * 4 for p in frozen.parameters())
    out.append({"rank": rank, "peak": peak, "local_bytes": local_bytes, "largest_full": largest_full,
                "wrong": wrong, "names": names, "whole_bytes": sum(p.numel() * 4 for p in whole.values()),
                "frozen_wrong": frozen_wrong, "frozen_bytes": frozen_bytes})
print("RESULT " + json.dumps(out))
"""


def _run(overrides: list[str], ranks: list[int]) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", WORKER, json.dumps(overrides), json.dumps(ranks)],
                          capture_output=True, text=True, timeout=240)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    return json.loads(line[len("RESULT "):])


@pytest.mark.timeout(300)
def test_every_rank_holds_its_slice_of_the_one_process_weights() -> None:
    """tp=2 x pp=2 x dp_shard=2 (2-D FSDP2 x TP sharding, strided where both cut dim 0): ranks 0, 3, 5, 6
    cover both stages and every tp and dp coordinate; their shards equal the whole model's slices. A
    frozen model (as DPO's reference) is cut by tp=2 x dp_shard=4 alike."""
    overrides = ["model.num_layers=4", "model.position=alibi", "parallel.tp=2", "parallel.pp=2",
                 "parallel.dp_shard=2", "train.global_batch_size=8"]
    results = _run(overrides, [0, 3, 5, 6])
    seen: set[str] = set()
    for r in results:
        assert r["wrong"] == [], r
        seen |= set(r["names"])
        # this rank's shards plus at most one module's full tensors (the largest: embedding or head)
        assert r["peak"] <= r["local_bytes"] + r["largest_full"] * 1.1, r
        assert r["local_bytes"] < r["whole_bytes"] / 4, r  # a stage's tp x dp share, not the whole model
        # a frozen model under tp=2 x dp_shard=4: sharded DTensors without gradients, the same values
        assert r["frozen_wrong"] == [] and r["frozen_bytes"] < r["whole_bytes"] / 4, r
    with torch.device("meta"):
        names = {n for n, _ in Transformer(load_config("tiny", overrides).model).named_parameters()}
    assert seen == names  # the two stages between them hold every parameter


def test_whole_model_init_is_a_function_of_the_seed_and_names() -> None:
    cfg = load_config("tiny")
    a, b = build_model(cfg, torch.device("cpu")), build_model(cfg, torch.device("cpu"))
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name
    other = build_model(cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": 7})}), torch.device("cpu"))
    assert not torch.equal(a.layers["0"].mlp.gate_proj.weight, other.layers["0"].mlp.gate_proj.weight)
    # two blocks' identical modules get different values (the key is the qualified name)
    assert not torch.equal(a.layers["0"].self_attn.W_pack.weight, a.layers["1"].self_attn.W_pack.weight)
    assert init_key(1, "layers.0") != init_key(1, "layers.1") and init_key(1, "x") == init_key(1, "x")
    # the rule itself: residual outputs scaled by 1/sqrt(2L), norms at one
    std = cfg.model.init_std
    assert a.layers["0"].mlp.down_proj.weight.std().item() == pytest.approx(std / (2 * cfg.model.num_layers) ** 0.5, rel=0.1)
    assert torch.equal(a.norm.weight, torch.ones_like(a.norm.weight))


def test_ppo_actor_and_critic_are_both_initialised() -> None:
    from haina.plugins.algorithms.ppo import ActorCritic

    cfg = load_config("tiny")
    with torch.device("meta"):
        model = ActorCritic(cfg)
    materialize(model, "cpu", 0)
    assert torch.equal(model.critic.norm.weight, torch.ones_like(model.critic.norm.weight))
    assert model.critic.head.weight.shape[0] == 1 and model.critic.head.weight.abs().sum() > 0
    assert not torch.equal(model.actor.embed_tokens.weight, model.critic.embed_tokens.weight)


def test_module_by_module_holds_one_module_at_a_time_with_the_same_values() -> None:
    """What ZeRO-3 builds through (``build_partitioned``): each module materialised and initialised in
    turn, then handed on; here the hand-off keeps a copy and empties the parameter, as a partition does."""
    cfg = load_config("tiny")
    reference = dict(build_model(cfg, torch.device("cpu")).named_parameters())
    model = build_model(cfg, META)
    prefixes = {id(m): f"{n}." if n else "" for n, m in model.named_modules()}
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    kept: dict[str, torch.Tensor] = {}
    live: list[int] = []

    def hand_off(module: nn.Module) -> None:
        live.append(sum(p.numel() for p in model.parameters() if not p.is_meta))
        for name, p in module.named_parameters(recurse=False):
            kept[prefixes[id(module)] + name] = p.detach().clone()
            p.data = torch.empty(0)

    materialize_each(model, torch.device("cpu"), cfg.train.seed, hand_off)
    assert max(live) == largest and len(live) == sum(1 for m in model.modules() if next(m.parameters(False), None) is not None)
    assert kept.keys() == reference.keys()
    for name, value in kept.items():
        assert torch.equal(value, reference[name]), name


class _Stateful(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))


def test_a_module_that_cannot_fill_its_state_is_refused_in_one_line() -> None:
    model = build_model(load_config("tiny"), META)
    model.layers["0"].extra = _Stateful()
    with pytest.raises(PluginError) as info:
        materialize(model, "cpu", 0)
    message = str(info.value)
    assert "\n" not in message and "layers.0.extra" in message and "reset_parameters()" in message, message
    # without a seed (weights loaded next) parameters are left alone, so the same module passes
    model = build_model(load_config("tiny"), META)
    model.layers["0"].extra = _Stateful()
    materialize(model, "cpu", None)
    assert not any(p.is_meta for p in model.parameters())


def test_deepspeed_backend_shards_frozen_models_as_fsdp2_does() -> None:
    """ZeRO partitions what it trains; a frozen reference or reward model goes through the engine's own
    prepare_frozen (meta, the layout's FSDP2 over the data-parallel ranks, shards filled), as above."""
    from haina.core.engine import Engine
    from haina.core.parallel.zero import ZeroEngine

    assert ZeroEngine.prepare_frozen is Engine.prepare_frozen
