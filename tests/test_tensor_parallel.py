"""Tensor and sequence parallelism (tp=2, gloo): parity with one process, W_pack/ALiBi sharding, vocab loss."""

from __future__ import annotations

import copy
import socket
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.debug import CommDebugMode

from haina.core.config import load_config
from haina.core.loss import chunked_lm_loss
from haina.core.model import Transformer
from haina.core.optim import build_optimizer
from haina.core.parallel.mesh import build_mesh, resolve_layout
from haina.core.parallel.tensor_parallel import TensorParallelError, apply_tensor_parallel, collect_tp_plans
from haina.plugins.algorithms.pretrain import Pretrain
from haina.plugins.model.position import alibi_slopes
from tests.parallel_helpers import gloo_rank

TP = 2
BATCH, SEQ = 2, 16
TERMS = {"cross_entropy": 1.0, "max_z": 0.1, "z_loss": 0.01}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, port: int, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
    with gloo_rank(rank, TP, port):
        fn(rank, *args)


def _spawn(fn: Callable[..., None], *args: Any) -> None:
    mp.spawn(_entry, args=(_free_port(), fn, args), nprocs=TP, join=True)


def _config(position: str, sequence_parallel: bool):
    return load_config(
        "tiny",
        [f"model.position={position}", f"parallel.tp={TP}", f"parallel.sequence_parallel={sequence_parallel}",
         "loss.chunk_size=12", f"train.seq_len={SEQ}", f"train.micro_batch_size={BATCH}"],
    )


def _batch(vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = -100  # ignored positions must stay ignored under the vocabulary split
    return tokens, labels


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(_full(actual), expected, rtol=1e-5, atol=1e-5, msg=what)


# --------------------------------------------------------------------------------------------- parity

def _parity_worker(rank: int, position: str) -> None:
    for sp in (False, True):
        cfg = _config(position, sp)
        mesh = build_mesh(resolve_layout(cfg, TP), "cpu")
        algorithm = Pretrain(cfg)
        algorithm.terms = dict(TERMS)
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        model.init_weights()
        reference = copy.deepcopy(model)
        batch = _batch(cfg.model.vocab_size, seed=1)

        expected = algorithm.loss(reference, batch)
        expected.loss.backward()
        apply_tensor_parallel(model, mesh["tp"], sp)
        got = algorithm.loss(model, batch)
        got.loss.backward()
        tag = f"{position} sp={sp}"
        _close(got.loss, expected.loss, f"loss {tag}")
        for k, v in expected.parts.items():
            _close(got.parts[k], v, f"{k} {tag}")

        ref_params = dict(reference.named_parameters())
        params = dict(model.named_parameters())
        assert set(params) == set(ref_params)  # names unchanged: checkpoints and HF export map 1:1
        for name, p in params.items():
            assert isinstance(p, DTensor), f"{name} is not a DTensor on the tp mesh"
            assert p.grad is not None, name
            assert p.grad.placements == p.placements, f"{name}: grad {p.grad.placements}, param {p.placements}"
            _close(p, ref_params[name].detach(), f"weight {name} {tag}")
        for name, p in params.items():
            _close(p.grad, ref_params[name].grad, f"grad {name} {tag}")

        with torch.no_grad():  # the head's own forward (generation) gives full logits
            tokens = batch[0]
            _close(model.logits(model(tokens)), reference.logits(reference(tokens)), f"logits {tag}")

        # One AdamW step keeps the two in step. The moments are compared tightly; the weights more
        # loosely, because Adam's first update g / (|g| + eps) turns a rounding-level difference of an
        # almost-zero gradient entry into a visible fraction of lr: eps = 1e-6 here (not 1e-8) keeps an
        # entry of |g| ~ 1e-8 from flipping a whole lr-sized step on a rounding difference.
        lr = 1e-3
        states = []
        for m in (reference, model):
            opt = build_optimizer(m, cfg.optim.model_copy(update={"eps": 1e-6}))
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
            opt.zero_grad()
            states.append({n: opt.state[p] for n, p in m.named_parameters()})
        for name, p in model.named_parameters():
            for key, atol in (("exp_avg", 1e-6), ("exp_avg_sq", 1e-8)):  # (1 - beta) g and (1 - beta2) g^2
                torch.testing.assert_close(
                    _full(states[1][name][key]), states[0][name][key], rtol=1e-5, atol=atol, msg=f"{key} {name}"
                )
            torch.testing.assert_close(_full(p), ref_params[name].detach(), rtol=0, atol=lr / 20, msg=lambda m, name=name: f"{name}: {m}")
        batch2 = _batch(cfg.model.vocab_size, seed=2)
        _close(algorithm.loss(model, batch2).loss, algorithm.loss(reference, batch2).loss, f"loss after step {tag}")


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_tp_matches_one_process(position: str) -> None:
    """Loss, every gradient and one AdamW step equal one process, with and without sequence parallel."""
    _spawn(_parity_worker, position)


# ---------------------------------------------------------------------------------------------- units

class _DerivedTerm:
    """A loss term without ``from_stats``: the vocabulary-parallel loss must gather its chunk's logits."""

    metric = "derived"

    def per_token(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (logits.float().softmax(-1) * logits.float()).sum(-1)


class _Planless(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _units_worker(rank: int) -> None:
    from haina.core import registry

    cfg = _config("alibi", True)
    mesh = build_mesh(resolve_layout(cfg, TP), "cpu")["tp"]
    h, n = cfg.model.hidden_size, cfg.model.num_heads
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    model.init_weights()
    full_qkv = model.layers["0"].self_attn.W_pack.weight.detach().clone()
    apply_tensor_parallel(model, mesh, sequence_parallel=True)

    # W_pack: a plain row shard of the unchanged Q;K;V layout, and the forward uses [Q_r; K_r; V_r].
    w_pack = model.layers["0"].self_attn.W_pack
    assert w_pack.weight.placements == (Shard(0),) and w_pack.weight.shape == (3 * h, h)
    torch.testing.assert_close(w_pack.weight.full_tensor(), full_qkv)
    rows = h // TP
    own = torch.cat([full_qkv[k * h + rank * rows : k * h + (rank + 1) * rows] for k in range(3)])
    x = torch.randn(2, 3, h, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(w_pack(x), x @ own.T)
    assert "layers.0.self_attn.W_pack.weight" in model.state_dict()

    # NormHead: vocabulary rows, normalized without any communication.
    assert model.head.weight.placements == (Shard(0),)
    with CommDebugMode() as comm:
        normalized = model.head.effective_weight()
    assert comm.get_total_counts() == 0 and normalized.placements == (Shard(0),)

    # ALiBi: this rank's heads' slopes, also after a re-init.
    heads = n // TP
    expected = alibi_slopes(n)[rank * heads : (rank + 1) * heads]
    torch.testing.assert_close(model.position.slopes, expected)
    model.position.reset_parameters()
    torch.testing.assert_close(model.position.slopes, expected)

    # Vocabulary-parallel loss alone (two chunks, one ragged, ignored targets, a gathered term).
    registry.register("loss", "test_derived")(_DerivedTerm)
    terms = {**TERMS, "test_derived": 0.5}
    g = torch.Generator().manual_seed(3)
    vocab, tokens = 64, 20
    hidden = torch.randn(tokens, 16, generator=g)
    weight = torch.randn(vocab, 16, generator=g)
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    targets[::7] = -100
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = chunked_lm_loss(h_ref, w_ref, targets, terms, chunk_size=8)
    ref.loss.backward()
    part = vocab // TP
    h_tp = hidden.clone().requires_grad_()
    w_tp = weight[rank * part : (rank + 1) * part].clone().requires_grad_()
    out = chunked_lm_loss(h_tp, w_tp, targets, terms, chunk_size=8, tp_group=mesh.get_group(),
                          vocab_start=rank * part)
    out.loss.backward()
    _close(out.loss, ref.loss, "vocab-parallel loss")
    for k, v in ref.parts.items():
        _close(out.parts[k], v, f"vocab-parallel {k}")
    _close(h_tp.grad, h_ref.grad, "vocab-parallel d/dhidden")
    _close(w_tp.grad, w_ref.grad[rank * part : (rank + 1) * part], "vocab-parallel d/dweight")

    # A component without a plan fails before anything is changed, naming the module.
    cfg = _config("rope", False)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    model.layers["1"].mlp = _Planless(cfg.model.hidden_size)
    with pytest.raises(TensorParallelError, match=r"layers\.1\.mlp\.proj \(Linear\).*no TP plan"):
        apply_tensor_parallel(model, mesh, sequence_parallel=False)
    assert not any(isinstance(p, DTensor) for p in model.parameters())


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_tp_units() -> None:
    """W_pack rows, ALiBi local slopes, the vocabulary-parallel loss alone, and the missing-plan error."""
    _spawn(_units_worker)


def test_missing_plan_message() -> None:
    """The plan check needs no process group: a third-party module without a plan is named in one line."""
    cfg = _config("rope", True)
    model = Transformer(cfg.model)
    model.layers["0"].mlp = _Planless(cfg.model.hidden_size)
    with pytest.raises(TensorParallelError) as info:
        collect_tp_plans(model, sequence_parallel=True)
    message = str(info.value)
    assert "\n" not in message and "layers.0.mlp.proj (Linear)" in message and "tp_plan" in message
    assert len(collect_tp_plans(Transformer(cfg.model), sequence_parallel=True)) > 0


@pytest.mark.parametrize("size", [2, 4, 8])
def test_qkv_regroup_plan_hands_each_rank_its_heads(size: int) -> None:
    """The all-to-all plan behind W_pack, simulated in one process: rank d ends with [Q_d; K_d; V_d]."""
    from haina.core.parallel.tensor_parallel import _regroup_plan

    h = 8 * size
    full = torch.arange(3 * h)  # row ids of the logical Q;K;V layout
    stored = full.view(size, -1)  # Shard(0): rank s stores a contiguous block of rows
    plans = [_regroup_plan(3 * h, 3, s, size) for s in range(size)]
    outgoing = [list(stored[s][perm].split(send)) for s, (perm, send, _) in enumerate(plans)]
    for d in range(size):
        received = torch.cat([outgoing[s][d] for s in range(size)])
        assert received.numel() == sum(plans[d][2])
        piece = h // size
        expected = torch.cat([full[k * h + d * piece : k * h + (d + 1) * piece] for k in range(3)])
        assert torch.equal(received, expected)


def _generation_worker(rank: int) -> None:
    from haina.core.generate import Sampling, generate

    for position in ("rope", "alibi"):
        cfg = _config(position, False)
        mesh = build_mesh(resolve_layout(cfg, TP), "cpu")["tp"]
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        model.init_weights()
        reference = copy.deepcopy(model).eval()
        apply_tensor_parallel(model, mesh, sequence_parallel=False)
        prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
        for sampling in (Sampling(max_new_tokens=6, temperature=0), Sampling(max_new_tokens=6, top_k=20, seed=1)):
            got = generate(model.eval(), prompts, sampling, eos_id=2)
            assert got == generate(reference, prompts, sampling, eos_id=2), (position, sampling)
            mine = torch.tensor(got[0][:3])  # every tp rank drew the same tokens
            theirs = mine.clone()
            dist.broadcast(theirs, src=0)
            assert torch.equal(mine, theirs)


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_generation_under_tp_matches_one_process() -> None:
    """KV-cached decoding with tp=2 (local heads cached per rank) gives one process's tokens."""
    _spawn(_generation_worker)
