"""Perplexity per source and overall: agreement with a hand count, JSONL and .bin/.idx inputs,
HF exports as input, one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from haina.core.model_loading import load_model
from haina.core.train import train
from haina.tools.eval.perplexity import evaluate_perplexity, format_table
from haina.tools.hf.export import export_hf
from haina.tools.tokenizer import Tokenizer, train_tokenizer
from tests.conftest import one_line_error, tiny_config, write_indexed


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("ppl") / "run"
    train(tiny_config(run_dir, tiny_data, "train.steps=6"))
    return run_dir


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pydoc_data.topics import topics

    from haina.core.config import TokenizerConfig

    folder = tmp_path_factory.mktemp("sp")
    (folder / "text.txt").write_text("\n".join(topics[k] for k in sorted(topics)[:10]), encoding="utf-8")
    return train_tokenizer([folder / "text.txt"], folder / "sp", TokenizerConfig(vocab_size=512, seed=1))


def _hand_count(model: torch.nn.Module, docs: list[list[int]], seq_len: int) -> tuple[float, int]:
    """(summed NLL, predicted tokens) counted by hand: every token of a document after its first is
    predicted once, from the tokens before it in its own window; a window holds ``seq_len`` predictions
    and the context restarts at each window (no reuse of the module's windowing, batching or chunks)."""
    total, count = 0.0, 0
    for doc in docs:
        targets = list(range(1, len(doc)))  # positions of the predicted tokens
        for first in range(0, len(targets), seq_len):
            predicted = targets[first : first + seq_len]
            context = doc[predicted[0] - 1 : predicted[-1]]  # the window's inputs, one per prediction
            assert len(context) == len(predicted) <= seq_len
            with torch.no_grad():
                logits = model.logits(model(torch.tensor([context])))[0]
            total += float(F.cross_entropy(logits, torch.tensor([doc[t] for t in predicted]), reduction="sum"))
            count += len(predicted)
    return total, count


def test_per_source_losses_match_a_hand_count(trained: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    docs_a = [rng.integers(3, 512, size=int(rng.integers(5, 150))).tolist() for _ in range(7)]
    docs_a += [rng.integers(3, 512, size=n).tolist() for n in (64, 65, 128, 129)]  # window edges (with eos)
    docs_b = [[7, 8, 9, 10] * 20 for _ in range(3)]
    prefix_a = write_indexed(tmp_path / "a", docs_a)
    prefix_b = write_indexed(tmp_path / "b", docs_b)
    report = evaluate_perplexity(trained, [str(prefix_a), str(prefix_b)], out=tmp_path / "ppl.json", batch_size=3,
                                 seq_len=64)
    assert set(report["sources"]) == {"a", "b"}
    _, model = load_model(trained)
    sums = {}
    for name, docs in (("a", docs_a), ("b", docs_b)):
        nll, count = _hand_count(model, [d + [2] for d in docs], 64)  # write_indexed appends eos = 2
        assert count == sum(len(d) for d in docs)  # every token but the first, plus the eos
        sums[name] = (nll, count)
        got = report["sources"][name]
        assert got["tokens"] == count
        assert got["loss"] == pytest.approx(nll / count, rel=1e-5)
        assert got["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    overall = sum(s[0] for s in sums.values()) / sum(s[1] for s in sums.values())
    assert report["overall"]["tokens"] == sum(s[1] for s in sums.values())
    assert report["overall"]["loss"] == pytest.approx(overall, rel=1e-5)
    assert report["sources"]["a"]["loss"] != pytest.approx(report["sources"]["b"]["loss"], rel=1e-2)
    assert json.loads((tmp_path / "ppl.json").read_text())["overall"]["tokens"] == report["overall"]["tokens"]


def test_jsonl_sources_and_hf_export(trained: Path, sp_model: Path, tmp_path: Path) -> None:
    lines = [{"text": "The quick brown fox jumps over the lazy dog.", "source": "en"},
             {"text": "def f(x):\n    return x + 1\n", "source": "code"},
             {"text": "for and while loops repeat statements"}]
    data = tmp_path / "eval.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in lines), encoding="utf-8")
    returned = evaluate_perplexity(trained, [str(data)], tokenizer=str(sp_model), out=tmp_path / "r.json")
    table = format_table(returned)
    assert "overall" in table and "code" in table and str(tmp_path / "r.json") in table
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["sources"]) == {"en", "code", "eval"}  # no source field: the file's name
    tok = Tokenizer(sp_model)
    assert report["sources"]["en"]["tokens"] == len(tok.encode(lines[0]["text"]))  # + eos, - 1 first token
    # The same numbers from an HF export of the same weights, which ships the tokenizer.
    export = export_hf(trained, tmp_path / "export", "baichuan", tokenizer=str(sp_model))
    assert (export / "tokenizer.model").read_bytes() == sp_model.read_bytes()
    tok_config = json.loads((export / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "BaichuanTokenizer" and tok_config["eos_token"] == "</s>"
    assert json.loads((export / "config.json").read_text())["eos_token_id"] == tok.eos_id
    again = evaluate_perplexity(export, [str(data)], out=tmp_path / "r2.json")  # tokenizer from the export
    assert again["overall"]["loss"] == pytest.approx(report["overall"]["loss"], rel=1e-5)


def test_bad_input_is_one_line(trained: Path, sp_model: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    cases = [
        ({"data": [str(tmp_path / "missing")]}, "neither a JSONL file nor a .bin/.idx prefix"),
        ({"data": [str(bad)]}, "needs a tokenizer"),
        ({"data": [str(bad)], "tokenizer": str(sp_model)}, "bad.jsonl:2: not valid JSON"),
        ({"data": [str(bad)], "seq_len": 100000}, "--seq-len 100000"),
        ({"data": [str(bad)], "batch_size": 0}, "--batch-size"),
        ({"data": [str(bad)], "tokenizer": str(sp_model), "overrides": ["model.num_layers=1"]}, "parallel.* and train"),
    ]
    for kwargs, message in cases:
        data = kwargs.pop("data")
        assert message in one_line_error(evaluate_perplexity, trained, data, out=tmp_path / "o.json", **kwargs)


@pytest.mark.integration
@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", [["parallel.tp=2"], ["parallel.pp=2"], []], ids=["tp2-sp", "pp2", "dp2"])
def test_parallel_layouts_match_one_process(trained: Path, tmp_path: Path, layout: list[str]) -> None:
    """Two torchrun workers under tensor (sequence) parallel, pipeline or data parallel layouts give the
    single-process report: windows dealt to dp ranks, vocabulary-parallel loss, forward-only schedules."""
    import os
    import subprocess
    import sys

    rng = np.random.default_rng(5)
    docs_a = [rng.integers(3, 512, size=int(rng.integers(5, 150))).tolist() for _ in range(9)]
    docs_b = [rng.integers(3, 60, size=int(rng.integers(5, 90))).tolist() for _ in range(4)]
    data = [str(write_indexed(tmp_path / "a", docs_a)), str(write_indexed(tmp_path / "b", docs_b))]
    single = evaluate_perplexity(trained, data, out=tmp_path / "one.json", batch_size=2, seq_len=64)
    command = [sys.executable, "-m", "haina.tools.cli", "eval", "ppl", "--nproc-per-node", "2", "--checkpoint",
               str(trained), "--data", *data, "--out", str(tmp_path / "two.json"), "--batch-size", "2",
               "--seq-len", "64", *layout]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "overall" in done.stdout and done.stdout.count("overall") == 1  # rank 0 prints alone
    report = json.loads((tmp_path / "two.json").read_text())
    assert report["layout"] != single["layout"]
    for name in ("a", "b"):
        assert report["sources"][name]["tokens"] == single["sources"][name]["tokens"]
        assert report["sources"][name]["loss"] == pytest.approx(single["sources"][name]["loss"], rel=1e-5)
    assert report["overall"]["ppl"] == pytest.approx(single["overall"]["ppl"], rel=1e-5)
