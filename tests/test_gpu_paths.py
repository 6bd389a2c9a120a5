"""The GPU paths a review found broken, each checked on CPU where its behaviour shows there: collectives on
the process group's device, FSDP2 accumulation memory, attention-bias copies, head-gradient precision,
the peak-FLOPS table, selective recompute, flex's compile choices, the refused tp+compile+selective mix."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
import tomllib
import torch

from haina.core import attention as kernels
from haina.core import collectives
from haina.core.attention import AttentionInputs
from haina.core.config import ModelConfig, load_config
from haina.core.metrics import peak_tflops_of
from haina.core.model import Transformer
from haina.core.parallel.activation_checkpoint import apply_activation_checkpointing
from haina.core.parallel.mesh import resolve_layout
from haina.tools.bench import memory_paths
from tests.conftest import one_line_error

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("core", "plugins", "tools", "data_spark")
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor", "broadcast",
    "barrier", "monitored_barrier", "all_to_all", "all_to_all_single", "gather", "scatter", "reduce", "send",
    "recv", "isend", "irecv", "all_gather_object", "broadcast_object_list", "gather_object",
    "scatter_object_list", "batch_isend_irecv",
}


def _distributed_aliases(tree: ast.Module) -> tuple[set[str], set[str]]:
    """Names bound to torch.distributed (``import torch.distributed as dist``) and collectives imported
    from it by name (``from torch.distributed import all_reduce``)."""
    modules, functions = {"torch.distributed"}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch.distributed":
                    modules.add(a.asname or a.name)
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            functions |= {a.asname or a.name for a in node.names if a.name in COLLECTIVES}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "distributed" for a in node.names):
            modules |= {a.asname or a.name for a in node.names if a.name == "distributed"}
    return modules, functions


def direct_collectives(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    modules, functions = _distributed_aliases(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in COLLECTIVES and ast.unparse(f.value) in modules:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(f)}")
        elif isinstance(f, ast.Name) and f.id in functions:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {f.id}")
    return found


def test_every_collective_goes_through_core_collectives() -> None:
    files = [p for d in PACKAGE_DIRS for p in (ROOT / d).rglob("*.py") if p != ROOT / "core" / "collectives.py"]
    assert len(files) > 100
    offenders = [hit for p in files for hit in direct_collectives(p)]
    assert offenders == []
    # the scan has teeth: it sees each spelling of a direct call
    sample = ROOT / "core" / "guard.py"
    for source in ("import torch.distributed as dist\ndist.all_reduce(x)\n",
                   "import torch\ntorch.distributed.barrier()\n",
                   "from torch.distributed import all_gather_object as ago\nago(a, b)\n"):
        tree_file = sample.with_name("_probe.py")
        try:
            tree_file.write_text(source)
            assert len(direct_collectives(tree_file)) == 1, source
        finally:
            tree_file.unlink()


@pytest.fixture
def cuda_group() -> Any:
    """The recorded process-group device set to CUDA (no GPU needed: the check runs before any call)."""
    collectives.set_device(torch.device("cuda", 0))
    yield
    collectives.set_device(torch.device("cpu"))


def test_a_cpu_tensor_on_a_cuda_group_is_refused_in_one_line(cuda_group: Any) -> None:
    """The crash of a multi-GPU resume (a CPU flag all-reduced on NCCL) now fails on CPU too, in one line."""
    message = one_line_error(collectives.all_reduce, torch.zeros(1, dtype=torch.int32), "max")
    assert "tensor on cpu" in message and "communicates on cuda" in message
    one_line_error(collectives.all_gather, [torch.zeros(1)], torch.zeros(1))
    one_line_error(collectives.all_to_all_single, torch.zeros(2), torch.zeros(2), [1], [1])


def test_value_collectives_reduce_on_the_group_device(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """verify (checkpoint) and reduce_values (perplexity, metrics) hand dist only group-device tensors."""
    from haina.core.checkpoint import TrainerState, save_checkpoint, verify
    from haina.core.distributed import init_distributed

    init_distributed(torch.device("cpu"))
    seen: list[torch.device] = []
    real = collectives.dist.all_reduce

    def spy(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append(tensor.device)
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(collectives.dist, "all_reduce", spy)
    model = torch.nn.Linear(4, 4)
    step = save_checkpoint(tmp_path, model, [], TrainerState(step=1))
    verify(step)
    sums = collectives.reduce_values(torch.tensor([[1.5, 2.0]], dtype=torch.float64))
    assert sums.tolist() == [[1.5, 2.0]] and sums.device.type == "cpu"
    assert collectives.any_true(True) and not collectives.any_true(False)
    assert seen and all(d == collectives.device() for d in seen)


def test_tp_compile_selective_is_refused_before_launch(capsys: Any) -> None:
    from haina.tools.cli import run

    cfg = load_config("tiny", ["parallel.tp=2", "parallel.compile=true", "parallel.activation_checkpoint=selective"])
    message = one_line_error(resolve_layout, cfg, 2)
    assert message.startswith("parallel.activation_checkpoint: selective")
    for ok in (["parallel.activation_checkpoint=full"], ["parallel.compile=false"], ["parallel.tp=1"]):
        resolve_layout(load_config("tiny", ["parallel.tp=2", "parallel.compile=true",
                                            "parallel.activation_checkpoint=selective", *ok]), 2)
    assert run(["pretrain", "--config", "tiny", "parallel.tp=2", "parallel.compile=true",
                "parallel.activation_checkpoint=selective"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "selective does not work with parallel.compile=true" in err


def test_fsdp_accumulation_holds_only_gradient_shards() -> None:
    """Gradient sync stays on during accumulation: after micro-batch 1 of 2 on a (fake) two-rank FSDP2
    world the gradients held are the local halves; with sync off FSDP2 held a whole fp32 copy (0.93 x)."""
    r = memory_paths.fsdp_accumulation_bytes()
    share = r["grad_bytes_after_first_microbatch"] / r["param_bytes"]
    print(f"gradient bytes after micro-batch 1 = {share:.2f} x fp32 parameters")
    assert 0.3 < share < 0.55


@pytest.mark.parametrize("kernel", ["sdpa", "xformers"])
def test_attention_bias_is_saved_once_for_all_layers(kernel: str) -> None:
    """ALiBi in bf16: one bias copy for the whole forward (was one per layer: 16x with sdpa, 8x xformers)."""
    if kernel == "xformers":
        with memory_paths.xformers_faked():
            r = memory_paths.bias_saved_bytes(kernel, layers=3)
    else:
        r = memory_paths.bias_saved_bytes(kernel, layers=3)
    assert r["saved_bias_bytes"] == r["one_bias_bytes"]


def test_xformers_plumbing_matches_sdpa() -> None:
    """The xformers kernel (faked by sdpa on CPU) gives sdpa's output with ALiBi and packed documents."""
    cfg = ModelConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=40, position="alibi")
    tokens = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    segments = torch.ones_like(tokens)
    segments[0, 15:] = 2
    segments[1, 30:] = 0
    outs = []
    with memory_paths.xformers_faked():
        for kernel in ("sdpa", "xformers"):
            torch.manual_seed(0)
            model = Transformer(cfg.model_copy(update={"attention": kernel}))
            model.init_weights()
            outs.append([model(tokens), model(tokens, segments=segments)])
    keep = (segments != 0)[..., None]
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outs[1][1] * keep, outs[0][1] * keep, atol=1e-5, rtol=1e-4)


def test_bf16_head_gradient_is_summed_in_fp32() -> None:
    """FSDP2 hands the loss a bf16 head weight; its gradient over 64 chunks matches an fp64 reference to
    bf16 rounding (a bf16 running sum over the chunks is several times further off)."""
    ours, old = memory_paths.head_grad_error()
    print(f"relative error of the bf16 head gradient: fp32 sum {ours:.2e}, bf16 running sum {old:.2e}")
    assert ours < 8e-3 and old > 2 * ours


def test_normhead_normalises_a_bf16_weight_in_fp32() -> None:
    cfg = ModelConfig(vocab_size=512, hidden_size=2048, num_layers=1, num_heads=8, max_seq_len=8)
    head = Transformer(cfg).head.bfloat16()
    with torch.no_grad():
        head.weight.normal_(0, 1)
    eff = head.effective_weight()
    assert eff.dtype == torch.bfloat16
    ref = (head.weight.double() / head.weight.double().norm(dim=1, keepdim=True)).bfloat16()
    assert (eff != ref).float().mean().item() < 1e-3


def test_mfu_peak_by_device_name() -> None:
    assert peak_tflops_of("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_of("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops_of("NVIDIA H100 NVL") == 835.0
    assert peak_tflops_of("NVIDIA H200 NVL") == 835.0
    assert peak_tflops_of("NVIDIA H200") == 989.0
    assert peak_tflops_of("NVIDIA A800-SXM4-80GB") == 312.0
    assert peak_tflops_of("NVIDIA GeForce RTX 4090") is None


@pytest.mark.parametrize(("kernel", "device", "recomputed"), [
    ("sdpa", "cpu", 2), ("sdpa", "cuda", 0), ("flash", "cuda", 0), ("xformers", "cuda", 0), ("flex", "cuda", 0),
    ("flex", "cpu", 2), ("auto", "cuda", 0), ("auto", "cpu", 2),
])
def test_selective_recomputes_only_kernels_that_keep_scores(kernel: str, device: str, recomputed: int) -> None:
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=16))
    assert apply_activation_checkpointing(model, "selective", kernel, device) == recomputed
    assert apply_activation_checkpointing(model, "full", kernel, device) == 2


def test_selective_keeps_recomputing_an_undeclared_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    from haina.core.parallel import activation_checkpoint

    monkeypatch.setattr(activation_checkpoint, "kernel_spec", lambda name: kernels.ANY_KERNEL)
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=16))
    assert apply_activation_checkpointing(model, "selective", "third_party", "cuda") == 2


def _cuda_inputs(bias_kind: str = "alibi") -> AttentionInputs:
    pos = torch.arange(16)
    return AttentionInputs(pos, pos, None, None, 1, 16, 16, torch.device("cuda"), torch.bfloat16, bias_kind=bias_kind)


def test_auto_sends_forwards_without_gradients_past_flex(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill and evaluation come in a new width each time: compiled flex would recompile per width."""
    from haina.plugins.model.attention_auto import AutoAttention

    monkeypatch.setattr(kernels, "kernel_available", lambda name: name in ("sdpa", "flex"))
    auto = AutoAttention()
    assert auto.choose(_cuda_inputs()) == "flex"
    with torch.no_grad():
        assert auto.choose(_cuda_inputs()) == "sdpa"
    monkeypatch.setattr(kernels, "kernel_available", lambda name: True)
    with torch.no_grad():
        assert auto.choose(_cuda_inputs()) == "flash"


def test_flex_block_mask_is_compiled_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.nn.attention.flex_attention as flex_module

    from haina.plugins.model.attention import FlexAttention

    calls: list[Any] = []
    monkeypatch.setattr(flex_module, "create_block_mask", lambda *a, **k: calls.append(k.get("_compile")))
    FlexAttention().prepare(_cuda_inputs("none"))
    pos = torch.arange(16)
    FlexAttention().prepare(AttentionInputs(pos, pos, None, None, 1, 16, 16, torch.device("cpu"), torch.float32))
    assert calls == [True, False]


def test_gpu_extra_requires_flash_attn_with_custom_ops() -> None:
    """flash-attn < 2.7 has no torch.library ops: graph breaks in every compiled block."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    spec = next(s for s in extras if s.startswith("flash-attn"))
    low = tuple(int(x) for x in spec.split(">=")[1].split(",")[0].split("."))
    assert low >= (2, 7), spec


def test_pipeline_stage_copies_only_its_share() -> None:
    """A stage used to deep-copy the whole model and then drop the rest (13B: 111 GB peak per GPU)."""
    from haina.core.parallel.pipeline import stage_module
    from haina.tools.bench.loss import cpu_peak_bytes

    model = Transformer(ModelConfig(vocab_size=4096, hidden_size=128, num_layers=8, num_heads=4, max_seq_len=16))
    whole = sum(p.numel() * 4 for p in model.parameters())
    peak, stage = cpu_peak_bytes(lambda: stage_module(model, range(6, 8), first=False, last=True))
    own = sum(p.numel() * 4 for p in stage.parameters())  # type: ignore[attr-defined]
    assert list(stage.layers.keys()) == ["6", "7"] and stage.embed_tokens is None  # type: ignore[attr-defined]
    print(f"stage copy peak {peak:,} bytes; its parameters {own:,}; the whole model {whole:,}")
    assert peak < 1.2 * own < whole


def test_process_group_gets_the_configured_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import timedelta

    from haina.core import distributed

    seen: dict[str, Any] = {}
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *a, **k: seen.update(k))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = load_config("tiny", ["parallel.collective_timeout_s=2400"])
    distributed.init_distributed(torch.device("cpu"), cfg.parallel.collective_timeout_s)
    assert seen["timeout"] == timedelta(seconds=2400)
    assert load_config("tiny").parallel.collective_timeout_s > 600  # NCCL's default would cut rank 0's index build


def test_rank_zero_reads_only_the_files_no_rank_checksummed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The manifest takes the other ranks' entries as given; rank 0 reads only what is left (its share)."""
    from haina.core import files

    for name in ("__0_0.distcp", "__1_0.distcp", ".metadata", "trainer_state.json"):
        (tmp_path / name).write_bytes(name.encode() * 100)
    others = files.manifest_entries(tmp_path, ["__1_0.distcp"])
    read: list[str] = []
    real = files._crc32
    monkeypatch.setattr(files, "_crc32", lambda path: read.append(path.name) or real(path))
    manifest = files.write_manifest(tmp_path, others)
    assert sorted(read) == [".metadata", "__0_0.distcp", "trainer_state.json"]
    assert set(manifest["files"]) == {"__0_0.distcp", "__1_0.distcp", ".metadata", "trainer_state.json"}
    files.verify_manifest(tmp_path)
