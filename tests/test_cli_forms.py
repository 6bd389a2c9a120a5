"""The command forms README.md promises, run in process through ``haina.tools.cli.run``: presets and
plugins, prompts, tokenizer train/report, scaling-law fit, chat on a sub-model (``--prefix actor.``), exit
statuses (bad input 2, a failure 1 with a traceback log), ``train.resume=false``, and the metrics of a run
(tflops, memory, lr against the schedule) recomputed here."""

from __future__ import annotations

import importlib.metadata
import io
import json
import math
import re
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sentencepiece as spm
import torch
import yaml
from torch import nn

from haina.core.config import HainaConfig, dump_config
from haina.core.metrics import read_metrics
from haina.core.model import Transformer
from haina.tools.cli import run
from tests.cli_helpers import cli_here
from tests.conftest import tiny_config

README_PRESETS = {"baichuan2-7b", "baichuan2-13b", "demo", "tiny"}
README_PLUGINS = {
    "position": {"rope", "alibi"}, "attention": {"auto", "sdpa", "flex", "flash", "xformers"},
    "norm": {"rmsnorm", "apex"}, "mlp": {"swiglu"}, "head": {"normhead", "linear", "value"},
    "loss": {"cross_entropy", "max_z", "z_loss"}, "algorithm": {"pretrain", "sft", "rm", "ppo", "dpo"},
}


def _pretrain_args(run_dir: Path, data: Path, *overrides: str) -> list[str]:
    return ["pretrain", "--config", "tiny", f"train.run_dir={run_dir}", f"data.prefixes=[{data}]", *overrides]


# ---------------------------------------------------------------------------------------- plugins


def test_plugins_and_presets(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli_here(capsys, "plugins", "--presets")
    assert code == 0 and set(out.split()) == README_PRESETS
    for name in out.split():  # each listed preset is a usable --config: it loads, then the override is refused
        code, _, err = cli_here(capsys, "pretrain", "--config", name, "model.num_layers=0")
        assert code == 2 and "model.num_layers" in err and len(err.strip().splitlines()) == 1, err

    code, out, _ = cli_here(capsys, "plugins")
    assert code == 0
    listed: dict[str, dict[str, str]] = {}  # kind -> name -> package
    kind = ""
    for line in out.splitlines():
        if re.fullmatch(r"[a-z_]+:", line):
            kind = line[:-1]
        elif found := re.match(r"  (\w+) +\((\S+)\)", line):
            listed.setdefault(kind, {})[found.group(1)] = found.group(2)
    for kind, names in README_PLUGINS.items():
        assert {name: listed.get(kind, {}).get(name) for name in names} == dict.fromkeys(names, "haina"), kind
    # an algorithm's own settings are listed under it, with default and description
    ppo = out[out.index("  ppo ") :].splitlines()
    assert "settings: ppo" in ppo[0]
    assert any(re.match(r" {6}clip \(float, default [0-9.]+\): \S", line) for line in ppo[1:8]), ppo[:8]


# ---------------------------------------------------------------------------------------- prompts

TAXONOMY = {
    "math": {"arithmetic": [{"name": "addition", "keywords": ["plus", "sum"]},
                            {"name": "subtraction", "keywords": ["minus"]}]},
    "text": {"transform": [{"name": "reverse", "keywords": ["backwards"]}]},
}
LEAVES = ("math/arithmetic/addition", "math/arithmetic/subtraction", "text/transform/reverse")


def _prompt(leaf: str, i: int) -> str:
    words = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "glass", "candle", "forest"]
    if leaf.endswith("addition"):
        return f"What is {i + 3} plus {2 * i + 1}?"
    if leaf.endswith("subtraction"):
        return f"What is {5 * i + 9} minus {i}?"
    return f"Write the word {words[i % len(words)]} backwards"


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_prompts_assign_cover_and_sample(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`haina prompts --taxonomy --assign classifier --labelled --report --sample --out` and `--assign rules`."""
    taxonomy = tmp_path / "taxonomy.yaml"
    taxonomy.write_text(yaml.safe_dump(TAXONOMY), encoding="utf-8")
    labelled = _write_jsonl(tmp_path / "labelled.jsonl",
                            [{"prompt": _prompt(leaf, i), "category": leaf} for leaf in LEAVES for i in range(10)])
    sizes = dict(zip(LEAVES, (7, 5, 3), strict=True))
    pool_rows = [{"id": f"{leaf}-{i}", "prompt": _prompt(leaf, 20 + i), "truth": leaf}
                 for leaf, n in sizes.items() for i in range(n)]
    pool = _write_jsonl(tmp_path / "pool.jsonl", pool_rows)
    report_path, sample_path = tmp_path / "coverage.json", tmp_path / "prompts.jsonl"
    code, out, _ = cli_here(capsys, "prompts", "--prompts", str(pool), "--taxonomy", str(taxonomy), "--assign",
                        "classifier", "--labelled", str(labelled), "--min-count", "4", "--report", str(report_path),
                        "--sample", "7", "--out", str(sample_path))
    assert code == 0
    assert out.startswith("15 prompts, 0 without a known category")
    report = json.loads(report_path.read_text())
    top, middle, leaf = report["levels"]
    assert {k: r["count"] for k, r in top["rows"].items()} == {"math": 12, "text": 3}
    assert {k: r["count"] for k, r in middle["rows"].items()} == {"math/arithmetic": 12, "text/transform": 3}
    assert {k: r["count"] for k, r in leaf["rows"].items()} == sizes
    assert top["rows"]["math"]["share"] == pytest.approx(12 / 15)
    assert (top["below_minimum"], middle["below_minimum"], leaf["below_minimum"]) == (
        ["text"], ["text/transform"], ["text/transform/reverse"])
    assert leaf["covered"] == leaf["categories"] == 3
    assert set(report["diversity"]) == set(LEAVES)
    # Stratified: 7 picks over pools of 7, 5 and 3 fill the categories evenly (3, 2, 2), no prompt twice.
    picked = [json.loads(line) for line in sample_path.read_text().splitlines()]
    assert len(picked) == 7 and len({p["id"] for p in picked}) == 7
    assert all("/".join(p["category"]) == p["truth"] for p in picked)  # the classifier got them right
    counts = {leaf_name: sum(p["truth"] == leaf_name for p in picked) for leaf_name in LEAVES}
    assert sorted(counts.values()) == [2, 2, 3]
    assert f"7 prompts from 3 categories written to {sample_path}" in out

    rules_report = tmp_path / "rules.json"
    code, _, _ = cli_here(capsys, "prompts", "--prompts", str(pool), "--taxonomy", str(taxonomy), "--assign", "rules",
                      "--report", str(rules_report))
    assert code == 0
    assert {k: r["count"] for k, r in json.loads(rules_report.read_text())["levels"][2]["rows"].items()} == sizes


# -------------------------------------------------------------------------------------- tokenizer


def _license_text(limit: int = 150_000) -> str:
    """License texts that ship with installed packages (haina's dependencies)."""
    texts: list[str] = []
    for name in ("scipy", "matplotlib", "pandas", "numpy", "torch", "pyspark", "sentencepiece"):
        try:
            files = importlib.metadata.distribution(name).files or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for file in files:
            if "LICENSE" in file.name.upper() or "COPYING" in file.name.upper():
                path = Path(str(file.locate()))
                if path.is_file():
                    texts.append(path.read_text(encoding="utf-8", errors="replace"))
        if sum(map(len, texts)) >= limit:
            break
    text = "\n".join(texts)[:limit]
    # the project's own dependencies (pinned by constraints.txt) ship far more than this
    assert len(text) >= 20_000, "not enough license text in the installed packages"
    return text


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`haina tokenizer train` on JSONL of license paragraphs, vocab 512; a held-out JSONL with sources."""
    folder = tmp_path_factory.mktemp("tok")
    paragraphs = [p.strip() for p in _license_text().split("\n\n") if p.strip()]
    train_rows, held_rows = paragraphs[:-20], paragraphs[-20:]
    _write_jsonl(folder / "corpus.jsonl", [{"text": p} for p in train_rows])
    _write_jsonl(folder / "heldout.jsonl", [{"text": p, "source": "a" if i % 3 else "b"}
                                            for i, p in enumerate(held_rows)])
    code = run(["tokenizer", "train", "--input", str(folder / "corpus.jsonl"), "--out", str(folder / "tok" / "haina"),
                "tokenizer.vocab_size=512", "tokenizer.seed=3"])
    assert code == 0
    return {"model": folder / "tok" / "haina.model", "vocab": folder / "tok" / "haina.vocab",
            "heldout": folder / "heldout.jsonl", "folder": folder}


def test_tokenizer_train_and_report(tokenizer_files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    model, heldout = tokenizer_files["model"], tokenizer_files["heldout"]
    assert model.is_file() and tokenizer_files["vocab"].is_file()
    sp = spm.SentencePieceProcessor(model_file=str(model))
    vocab_lines = re.findall(r"\t-?\d+\n", tokenizer_files["vocab"].read_text(encoding="utf-8"))  # "piece\tscore"
    assert sp.get_piece_size() == 512 == len(vocab_lines)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert len(sp.encode("2024")) == 4  # split digits
    assert len(sp.encode("<reserved_106>")) == 1 and len(sp.encode("<reserved_107>")) == 1  # chat role tokens
    assert sp.decode(sp.encode("permission  notice\n\tx")) == "permission  notice\n\tx"  # identity, no dummy prefix

    code, out, _ = cli_here(capsys, "tokenizer", "report", "--model", str(model), "--heldout", str(heldout))
    assert code == 0
    rows = [json.loads(line) for line in heldout.read_text().splitlines()]
    table = {line.split()[0]: line.split()[1:] for line in out.splitlines()[3:]}
    assert set(table) == {"a", "b", "all"}
    for name, chosen in (("a", [r for r in rows if r["source"] == "a"]), ("b", [r for r in rows if r["source"] == "b"]),
                         ("all", rows)):
        docs, nbytes, tokens, per_byte, per_token = table[name]
        expected_bytes = sum(len(r["text"].encode("utf-8")) for r in chosen)
        expected_tokens = sum(len(sp.encode(r["text"])) for r in chosen)
        assert (int(docs), int(nbytes.replace(",", "")), int(tokens.replace(",", ""))) == (
            len(chosen), expected_bytes, expected_tokens)
        assert float(per_byte) == pytest.approx(expected_tokens / expected_bytes, abs=1e-4)
        assert float(per_token) == pytest.approx(expected_bytes / expected_tokens, abs=1e-3)
    assert float(table["all"][3]) < 0.8  # merged pieces: well under one token per byte on held-out text


# ------------------------------------------------------------------------------------ scaling law


def test_scaling_law_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b, l_inf = 250.0, -0.1, 2.0
    flops = np.geomspace(1e13, 1e17, 6)
    points = [{"name": f"r{i}", "flops": float(c), "loss": float(a * c**b + l_inf)} for i, c in enumerate(flops)]
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"points": points}))
    code, out, _ = cli_here(capsys, "scaling-law", "fit", "--sweep", str(sweep), "--holdout-largest", "--out",
                        str(tmp_path / "fit"), "--target-params", "1e9", "--target-tokens", "2e10")
    assert code == 0 and "held out r5" in out
    report = json.loads((tmp_path / "fit.json").read_text())
    assert [p["name"] for p in report["points"]] == ["r0", "r1", "r2", "r3", "r4"]
    fit = report["fit"]
    assert (fit["a"], fit["b"], fit["l_inf"]) == (pytest.approx(a, rel=0.02), pytest.approx(b, rel=0.02),
                                                  pytest.approx(l_inf, rel=0.02))
    assert report["holdout"]["predicted"] == pytest.approx(points[-1]["loss"], rel=1e-3)
    target = 6 * 1e9 * 2e10
    assert report["target"]["flops"] == pytest.approx(target)
    assert report["target"]["predicted"] == pytest.approx(a * target**b + l_inf, rel=1e-3)
    assert (tmp_path / "fit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------- chat --prefix


class _TwoModels(nn.Module):
    """A checkpoint shaped like a PPO run's: the policy under ``actor.``, another model beside it."""

    def __init__(self, cfg: HainaConfig) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.actor = Transformer(cfg.model)
        self.actor.init_weights()
        torch.manual_seed(2)
        self.critic = Transformer(cfg.model)
        self.critic.init_weights()


@torch.no_grad()
def _greedy_reply(model: Transformer, sp: spm.SentencePieceProcessor, text: str, steps: int) -> str:
    """The reply to one user turn in the chat format, decoded greedily by hand (no cache)."""
    ids = [sp.piece_to_id("<reserved_106>"), *sp.encode(text), sp.piece_to_id("<reserved_107>")]
    out: list[int] = []
    for _ in range(steps):
        token = int(model.logits(model(torch.tensor([ids])))[0, -1, : sp.get_piece_size()].argmax())
        if token == sp.eos_id():
            break
        out.append(token)
        ids.append(token)
    return sp.decode(out)


def test_chat_on_a_sub_model(tmp_path: Path, tiny_data: Path, tokenizer_files: dict[str, Path],
                             capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from haina.core.checkpoint import TrainerState, save_checkpoint
    from haina.core.distributed import init_distributed

    run_dir = tmp_path / "ppo-like"
    cfg = tiny_config(run_dir, tiny_data, f"data.tokenizer={tokenizer_files['model']}")
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    models = _TwoModels(cfg)
    init_distributed(torch.device("cpu"))
    save_checkpoint(run_dir / "checkpoints", models, [], TrainerState(step=1))
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_files["model"]))
    expected = {p: _greedy_reply(getattr(models, p), sp, "hello there", 3) for p in ("actor", "critic")}
    assert expected["actor"] != expected["critic"], "the two sub-models must answer differently"

    def chat(*extra: str) -> tuple[int, str, str]:
        monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n/exit\n"))
        return cli_here(capsys, "chat", "--checkpoint", str(run_dir), "--temperature", "0", "--repetition-penalty", "1",
                    "--max-new-tokens", "3", *extra)

    for prefix in ("actor", "critic"):
        code, out, err = chat("--prefix", f"{prefix}.")
        assert code == 0, err
        assert out == f"model> {expected[prefix]}\n"
    code, out, err = chat()  # the whole checkpoint is no language model: no weight without a prefix
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "no weight" in err


# ------------------------------------------------------------------------------- exit statuses


def test_bad_input_exits_2_and_a_failure_exits_1_with_a_traceback_log(
    tmp_path: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = cli_here(capsys, *_pretrain_args(tmp_path / "bad", tiny_data, "model.hidden_size=-8"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "model.hidden_size" in err

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected optimizer failure")

    monkeypatch.setattr("haina.core.train.build_optimizer", broken)
    run_dir = tmp_path / "fails"
    code, _, err = cli_here(capsys, *_pretrain_args(run_dir, tiny_data, "train.steps=1"))
    assert code == 1
    assert len(err.strip().splitlines()) == 1, err
    found = re.fullmatch(r"haina pretrain: failed: RuntimeError: injected optimizer failure \(traceback: (.+)\)",
                         err.strip())
    assert found, err
    log = Path(found.group(1))
    assert log.is_file() and log.parent == run_dir / "logs"  # the run's logs/ folder
    text = log.read_text(encoding="utf-8")
    assert text.startswith("Traceback (most recent call last)") and "broken" in text
    assert text.rstrip().endswith("RuntimeError: injected optimizer failure")


# ---------------------------------------------------------------------------------- training runs

LR, MIN_LR = 1e-3, 1e-4


def _cosine(step: int, warmup: int, total: int) -> float:
    """Optimizer step ``step`` (0-based): linear warmup to LR over ``warmup`` steps, then a half cosine
    from LR down to MIN_LR over the remaining ``total - warmup`` steps."""
    if step < warmup:
        return LR * (step + 1) / warmup
    progress = (step - warmup) / (total - warmup)
    return MIN_LR + (LR - MIN_LR) * (1 + math.cos(math.pi * progress)) / 2


def test_resume_false_starts_again_from_step_1(tmp_path: Path, tiny_data: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    common = ["optim.warmup_steps=0", f"optim.lr={LR}", f"optim.min_lr={MIN_LR}", "train.log_every=1"]
    assert cli_here(capsys, *_pretrain_args(run_dir, tiny_data, "train.steps=2", "train.save_every=2", *common))[0] == 0
    first = read_metrics(run_dir)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_2"
    code, out, _ = cli_here(capsys, *_pretrain_args(run_dir, tiny_data, "train.steps=4", "train.resume=false", *common))
    assert code == 0 and out.startswith("trained 4 steps")
    again = read_metrics(run_dir)
    assert [r["step"] for r in again] == [1, 2, 3, 4]  # the first run's records are replaced
    # Fresh weights: the first step's loss is the first run's (same seed), not the trained checkpoint's.
    assert again[0]["loss"] == pytest.approx(first[0]["loss"], rel=1e-6)
    assert again[1]["loss"] == pytest.approx(first[1]["loss"], rel=1e-6)
    # The schedule of a 4-step run from its start: step 2 is a quarter into the cosine (the 2-step run's
    # step 2 was halfway).
    assert [r["lr"] for r in again] == pytest.approx([_cosine(s, 0, 4) for s in range(4)], rel=1e-9)
    assert first[1]["lr"] == pytest.approx(_cosine(1, 0, 2), rel=1e-9) != pytest.approx(again[1]["lr"])
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_4"


def _rss_gib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process from /proc, in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20  # kB
    raise AssertionError(f"{field} not in /proc/self/status")


def test_metrics_of_a_run(tmp_path: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str],
                          monkeypatch: pytest.MonkeyPatch) -> None:
    """metrics.jsonl of a 4-step run: the README's fields; tokens/s against step times clocked here; tflops
    from a FLOP count made here; memory between this process's resident size before and its peak after;
    lr on the warmup + cosine schedule."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs /proc to bound the memory figure")
    import haina.core.train as train_module

    # Clock each step from the start of its forward to its end (the step_end fault point, after the update).
    starts: list[float] = []
    ends: list[float] = []
    forward_backward, fire = train_module._forward_backward, train_module.faults.fire

    def timed_forward_backward(*args: Any, **kwargs: Any) -> Any:
        starts.append(time.perf_counter())
        return forward_backward(*args, **kwargs)

    def timed_fire(point: str, *args: Any, **kwargs: Any) -> Any:
        if point == "step_end":
            ends.append(time.perf_counter())
        return fire(point, *args, **kwargs)

    monkeypatch.setattr(train_module, "_forward_backward", timed_forward_backward)
    monkeypatch.setattr(train_module.faults, "fire", timed_fire)
    run_dir = tmp_path / "run"
    rss_before = _rss_gib("VmRSS")
    started = time.perf_counter()
    code, _, _ = cli_here(capsys, *_pretrain_args(run_dir, tiny_data, "train.steps=4", "optim.warmup_steps=2",
                                              f"optim.lr={LR}", f"optim.min_lr={MIN_LR}", "train.log_every=1"))
    wall = time.perf_counter() - started
    # the peak resident size so far; getrusage's figure too (in KiB), which also counts a peak inherited
    # across exec
    peak_after = max(_rss_gib("VmHWM"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    assert code == 0
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert {"loss", "lm_loss", "max_z_loss", "grad_norm", "lr", "tokens_per_s", "tflops", "memory_gib"} <= set(r)
        assert "mfu" not in r  # a CPU has no known peak
        assert all(math.isfinite(r[k]) for k in ("loss", "lm_loss", "max_z_loss", "grad_norm"))

    # lr: tiny preset, warmup 2 of 4 steps -> 5e-4, 1e-3, then the cosine from 1e-3 at its start and halfway
    # (1e-4 + 9e-4 / 2 = 5.5e-4)
    assert [r["lr"] for r in records] == pytest.approx([5e-4, 1e-3, 1e-3, 5.5e-4], rel=1e-9)
    assert [r["lr"] for r in records] == pytest.approx([_cosine(s, 2, 4) for s in range(4)], rel=1e-9)

    # tflops = tokens/s x training FLOPs per token: 6 per matmul parameter (forward 2, backward 4) plus the
    # causal attention scores, QK^T and AV at 2 * seq * hidden FLOPs each per token and layer, halved by
    # the causal mask, times 3 for forward + backward.
    cfg = tiny_config(run_dir, tiny_data)
    model = Transformer(cfg.model)
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and not n.startswith("embed_tokens"))
    h, layers, seq = cfg.model.hidden_size, cfg.model.num_layers, cfg.train.seq_len
    assert matmul == layers * (4 * h * h + 3 * h * cfg.model.ffn_size) + cfg.model.vocab_size * h
    flops_per_token = 6 * matmul + 3 * (2 * 2 * seq * h) / 2 * layers
    tokens_per_step = cfg.train.micro_batch_size * seq
    for r in records:
        assert r["tflops"] == pytest.approx(r["tokens_per_s"] * flops_per_token / 1e12, rel=1e-9)
    # tokens/s: the time it implies for each step (one step a record) covers the step's own forward,
    # backward and update, and fits between the end of the step before and the start of the step after.
    assert len(starts) == len(ends) == 4
    implied = [tokens_per_step / r["tokens_per_s"] for r in records]
    for k in range(4):
        assert implied[k] >= ends[k] - starts[k], (k, implied, starts, ends)
    for k in (1, 2):
        assert implied[k] <= starts[k + 1] - ends[k - 1], (k, implied, starts, ends)
    assert sum(implied) <= wall

    memory = [r["memory_gib"] for r in records]  # CPU: the process's peak resident size
    assert memory == sorted(memory)
    assert rss_before * 0.999 <= memory[0] and memory[-1] <= peak_after * 1.001
