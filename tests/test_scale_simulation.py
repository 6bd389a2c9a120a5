"""Baichuan2-13B laid out for 1,024 ranks without GPUs (torch's fake process group, meta tensors): the
per-rank shards of every parameter add up to it, the stages hold the model once, the embedding and head
sit on the end stages and ``parallel.pp_stage_layers`` rebalances them, and the vocabulary-parallel head
gives each tp rank its 15,712 rows."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import pytest

BASE = ["--config", "baichuan2-13b", "--world", "1024", "--json", "parallel.tp=8", "parallel.pp=4",
        "train.global_batch_size=1024", "train.micro_batch_size=1"]
HIDDEN, FFN, LAYERS, VOCAB = 5120, 13696, 40, 125696
# the 13B model counted by hand: W_pack 3h^2 + o_proj h^2 + SwiGLU 3 h ffn + two norms, per block;
# embedding and head V h each; the final norm h
PARAMETERS = LAYERS * (4 * HIDDEN**2 + 3 * HIDDEN * FFN + 2 * HIDDEN) + 2 * VOCAB * HIDDEN + HIDDEN


# the layouts the tests read; all simulated at once on first use, each in a process of its own (the fake
# world needs its own process group), side by side
LAYOUTS = (("parallel.dp_shard=32",), ("parallel.dp_replicate=4", "parallel.dp_shard=8"),
           ("parallel.dp_shard=32", "parallel.pp_stage_layers=[9,11,11,9]"))


@functools.cache
def _reports() -> dict[tuple[str, ...], dict]:
    procs = {o: subprocess.Popen([sys.executable, "-m", "haina.tools.simulate", *BASE, *o], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for o in LAYOUTS}
    reports = {}
    for overrides, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        reports[overrides] = json.loads(out.strip().splitlines()[-1])
    return reports


def _simulate(*overrides: str) -> dict:
    """The simulation's JSON report of one of :data:`LAYOUTS`."""
    return _reports()[overrides]


@pytest.mark.parametrize(("name", "overrides", "ranks_per_stage"), [
    ("fsdp", ["parallel.dp_shard=32"], 256),
    ("hsdp", ["parallel.dp_replicate=4", "parallel.dp_shard=8"], 64),
])
def test_13b_on_1024_ranks_shards_to_the_model(name: str, overrides: list[str], ranks_per_stage: int) -> None:
    report = _simulate(*overrides)
    assert report["world"] == 1024 and report["model_parameters"] == PARAMETERS == 13_896_668_160
    assert report["every_parameter_once"] and report["stage_parameters_sum"] == PARAMETERS
    stages = report["stages"]
    assert [s["blocks"] for s in stages] == [list(range(10 * i, 10 * i + 10)) for i in range(4)]
    assert [(s["embedding"], s["head"]) for s in stages] == [(True, False), (False, False), (False, False), (False, True)]
    assert all(s["shards_cover"] for s in stages)
    for s in stages:  # one rank's share: the stage over tp x dp_shard, up to the padding of uneven splits
        even = s["parameters"] / ranks_per_stage
        assert even <= s["largest_local_shard_sum"] <= 1.02 * even, (name, s)
    assert report["vocab_parallel"] == [[VOCAB // 8, k * VOCAB // 8] for k in range(8)]


def test_uneven_cut_balances_the_end_stages() -> None:
    """The embedding and head (0.64B each) make the end stages 20% heavier; 9/11/11/9 blocks evens them."""
    even = [s["parameters"] for s in _simulate("parallel.dp_shard=32")["stages"]]
    cut = _simulate("parallel.dp_shard=32", "parallel.pp_stage_layers=[9,11,11,9]")
    assert [len(s["blocks"]) for s in cut["stages"]] == [9, 11, 11, 9] and cut["every_parameter_once"]
    balanced = [s["parameters"] for s in cut["stages"]]
    assert max(even) / min(even) > 1.2 and max(balanced) / min(balanced) < 1.01
