"""Pipeline parity: pp=2 (1F1B, interleaved) gives one process's loss and per-parameter gradients."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from haina.core.config import load_config
from haina.core.model import Transformer
from haina.core.parallel.mesh import build_mesh, resolve_layout
from haina.core.parallel.pipeline import build_pipeline, stage_layer_ranges
from haina.plugins.algorithms.pretrain import Pretrain
from tests.parallel_helpers import gloo_rank

MICRO, ACCUM, SEQ = 2, 4, 32


def _overrides(position: str, extra: list[str]) -> list[str]:
    return [
        "model.num_layers=4", f"model.position={position}", f"train.seq_len={SEQ}",
        f"train.micro_batch_size={MICRO}", f"train.global_batch_size={MICRO * ACCUM}", "parallel.pp=2", *extra,
    ]


def _worker(rank: int, port: int, position: str, extra: list[str]) -> None:
    """One pp rank: run the pipeline step and compare with the one-process reference built here too."""
    with gloo_rank(rank, 2, port):
        cfg = load_config("tiny", _overrides(position, extra))
        layout = resolve_layout(cfg, 2)
        assert layout.grad_accum == ACCUM
        mesh = build_mesh(layout, "cpu")
        algorithm = Pretrain(cfg)
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        model.init_weights()
        tokens = torch.randint(0, cfg.model.vocab_size, (MICRO * ACCUM, SEQ), generator=torch.Generator().manual_seed(1))
        labels = torch.roll(tokens, -1, dims=1)
        pipe = build_pipeline(model, mesh["pp"], cfg, layout, algorithm, torch.device("cpu"))
        reference = algorithm.loss(model, (tokens, labels)).loss
        reference.backward()
        result = pipe.step(tokens if pipe.has_first else None, labels if pipe.has_last else None)
        grads = {n: p.grad for part in pipe.model_parts for n, p in part.named_parameters()}
        gathered: list[dict[str, torch.Tensor]] = [{}, {}]
        dist.all_gather_object(gathered, grads)
        if pipe.has_last:
            assert result.loss is not None and result.parts is not None
            assert abs(result.loss - reference.item()) <= 1e-5 * abs(reference.item())
        if rank == 0:
            merged = {**gathered[0], **gathered[1]}
            expected = dict(model.named_parameters())
            assert set(merged) == set(expected)
            for name, param in expected.items():
                assert merged[name] is not None, name
                torch.testing.assert_close(merged[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize("position", ["rope", "alibi"])
@pytest.mark.parametrize(
    "extra",
    [[], ["parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2"]],
    ids=["1f1b", "interleaved"],
)
def test_pipeline_matches_one_process(position: str, extra: list[str]) -> None:
    mp.spawn(_worker, args=(_free_port(), position, extra), nprocs=2, join=True)


def test_stage_split_covers_layers_in_order() -> None:
    """Every layer in exactly one stage, contiguous, sizes within one of each other."""
    for layers, stages in [(4, 2), (4, 4), (5, 2), (7, 4)]:
        ranges = stage_layer_ranges(layers, stages)
        assert [i for r in ranges for i in r] == list(range(layers))
        assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
