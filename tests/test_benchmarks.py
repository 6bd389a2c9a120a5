"""The README's benchmarks at their smallest settings, in-process through their ``main``: the printed
numbers are there and sane. ``bench.speed`` has its test in tests/test_speed.py; ``bench.loss``'s run in
tests/test_loss.py checks only the labels, so its numbers are checked here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.data_helpers import spark  # noqa: F401  (session fixture: the benchmarks' get_session reuses it)

NUMBER = r"([-+]?\d[\d,]*\.?\d*(?:e[-+]?\d+)?)"


def _num(pattern: str, text: str) -> float:
    match = re.search(pattern.replace("{n}", NUMBER), text)
    assert match, f"{pattern!r} not in:\n{text}"
    return float(match.group(1).replace(",", ""))


def test_bench_loss_chunked_needs_less_memory(capsys: pytest.CaptureFixture[str]) -> None:
    """Logits of 512 tokens x vocab 8192 (16 MiB): naive holds them (and their gradient), chunks of 64
    hold an eighth; both give the same loss."""
    from haina.tools.bench.loss import main

    assert main(["--vocab", "8192", "--tokens", "512", "--hidden", "16", "--chunk", "64", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert _num(r"logits {n} MiB", out) == 16
    naive_peak, naive_working = _num(r"naive\s+peak\s+{n} MiB", out), _num(r"naive.*working \(peak - grads\)\s+{n} MiB", out)
    chunked_peak = _num(r"chunked\s+peak\s+{n} MiB", out)
    assert naive_peak >= 16 and naive_working >= 16 and chunked_peak < naive_peak / 4
    peak_ratio, working_ratio = _num(r"ratio chunked/naive: peak {n}", out), _num(r"ratio.*working {n}", out)
    assert 0 < peak_ratio < 0.25 and 0 <= working_ratio < 0.25
    naive_loss, chunked_loss = _num(r"naive.*loss {n}", out), _num(r"chunked.*loss {n}", out)
    assert naive_loss == pytest.approx(chunked_loss, abs=1e-4) and 8 < naive_loss < 11  # ~ln(8192) = 9.0
    assert _num(r"\|loss diff\| {n}", out) < 1e-4
    assert _num(r"naive.*time\s+{n} s", out) > 0 and _num(r"chunked.*time\s+{n} s", out) > 0


def test_bench_memory_paths_bias_once_and_head_gradient(capsys: pytest.CaptureFixture[str]) -> None:
    """Two layers at seq 64: one bias copy saved for both (sdpa and faked xformers); the bf16 head gradient
    summed in fp32 is closer to fp64 than a bf16 running sum."""
    from haina.tools.bench.memory_paths import main

    main(["--layers", "2", "--seq", "64", "--heads", "2"])
    out = capsys.readouterr().out
    one_bias = 2 * 64 * 64 * 2  # heads x seq x seq x bf16 bytes
    for kernel in ("sdpa", "xformers"):
        assert _num(kernel + r"\s+ALiBi bf16, 2 layers: saved bias bytes {n}", out) == one_bias, out
        assert _num(kernel + r".*= {n} x one bias", out) == 1.0
        assert _num(kernel + r".*one bias \({n}\)", out) == one_bias
    ours, old = _num(r"relative error {n}", out), _num(r"bf16 running sum {n}", out)
    assert 0 < ours < 8e-3 and old > 2 * ours
    assert "FSDP2" not in out  # only with --fsdp


@pytest.mark.integration  # --fsdp starts a child process with a fake two-rank group
def test_bench_memory_paths_fsdp_holds_gradient_shards(capsys: pytest.CaptureFixture[str]) -> None:
    from haina.tools.bench.memory_paths import main

    main(["--layers", "1", "--seq", "32", "--heads", "2", "--fsdp"])
    share = _num(r"gradient bytes held after micro-batch 1 [\d,]+ = {n} x the fp32 parameters", capsys.readouterr().out)
    assert 0.3 < share < 0.55  # the local halves, not an unsharded fp32 copy (~0.93)


def _imports_report(out: str) -> dict[str, float]:
    return {
        "internal": _num(r"internal imports\s+{n}", out), "deferred": _num(r"deferred into bodies\s+{n}", out),
        "share": _num(r"deferred into bodies\s+\d+ \({n}%\)", out), "wrong": _num(r"wrong-way imports\s+{n}", out),
        "cycles": _num(r"modules in cycles\s+{n}", out), "lines": _num(r"lines of code\s+{n}", out),
    }


def test_bench_imports_of_this_checkout(capsys: pytest.CaptureFixture[str]) -> None:
    """No wrong-way imports and no cycles in this checkout; `haina --help` imports little (the command
    defers its heavy imports), `haina plugins` more."""
    from haina.tools.bench.imports import main

    main([])
    out = capsys.readouterr().out
    r = _imports_report(out)
    assert r["wrong"] == 0 and r["cycles"] == 0
    assert r["internal"] > 100 and 0 < r["deferred"] < r["internal"] and r["lines"] > 5000
    assert r["share"] == pytest.approx(100 * r["deferred"] / r["internal"], abs=0.05)
    help_s, plugins_s = _num(r"haina --help imports\s+{n} s", out), _num(r"haina plugins imports\s+{n} s", out)
    assert 0 <= help_s < 2 and 0 < plugins_s < 30


def test_bench_imports_counts_a_planted_checkout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A checkout built to have, by hand: 4 internal imports (1 in a function body), 1 wrong-way import
    (core -> tools) and a cycle of 2 modules (core.a <-> tools.x), 9 lines."""
    from haina.tools.bench.imports import main

    (tmp_path / "core").mkdir()
    (tmp_path / "tools").mkdir()
    (tmp_path / "plugins").mkdir()
    (tmp_path / "core" / "a.py").write_text("import haina.tools.x\n")
    (tmp_path / "core" / "b.py").write_text("from haina.core import a\n\n\ndef f():\n    import haina.core.a\n")
    (tmp_path / "tools" / "x.py").write_text("from haina.core.a import thing\n")
    (tmp_path / "plugins" / "p.py").write_text("import os\nimport json\n")
    main(["--root", str(tmp_path), "--no-help-time"])
    out = capsys.readouterr().out
    assert _imports_report(out) == {"internal": 4, "deferred": 1, "share": 25.0, "wrong": 1, "cycles": 2, "lines": 9}
    assert "haina --help" not in out

    with pytest.raises(SystemExit, match="no source checkout"):
        main(["--root", str(tmp_path / "tools"), "--no-help-time"])


@pytest.mark.integration  # a Spark session (local[2]); ~1 min on two cores
@pytest.mark.timeout(300)
def test_bench_dedup_small_corpus(
    spark, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]  # noqa: F811
) -> None:
    """400 documents: precision and recall in [0, 1] and high at threshold 0.8; recall by similarity rises
    with the Jaccard bucket, as the LSH S-curve does."""
    from haina.tools.bench.dedup import main

    main(["--docs", "400", "--skip-job"])
    out = capsys.readouterr().out
    assert _num(r"{n} documents", out) == 400 and _num(r"documents, {n} planted pairs", out) > 20
    bands, rows = _num(r"LSH {n} bands", out), _num(r"bands x {n} rows", out)
    assert bands >= 1 and rows >= 1
    for name in ("document dedup", "verified links", "same cluster"):
        precision, recall = _num(name + r"\s+precision {n}", out), _num(name + r".*recall {n}", out)
        assert 0.9 <= precision <= 1 and 0.8 <= recall <= 1, (name, out)
    assert _num(r"\({n} removed", out) >= 1
    table = [[float(x) for x in line.replace("-", " ", 1).split()]
             for line in out.splitlines() if re.match(r"\s*0\.\d\d-\d\.\d\d ", line)]
    assert len(table) >= 4
    for _low, _high, pairs, banded, s_curve, linked in table:
        assert pairs >= 1 and all(0 <= x <= 1 for x in (banded, s_curve, linked))
    s_curves = [row[4] for row in table]
    assert s_curves == sorted(s_curves)  # the S-curve at each bucket's middle rises
    assert all(row[5] == 1.0 for row in table if row[0] >= 0.85)  # well above the threshold: all linked
    assert all(row[5] == 0.0 for row in table if row[1] <= 0.7)  # well below: none
    assert _num(r"Spark MinHash stage \(local\[2\]\): {n} docs/s", out) > 0
    assert _num(r"datasketch MinHashLSH \(1 process\): {n} docs/s", out) > 0
    assert _num(r"Spark MinHash stage .*, {n} core-ms/doc\)", out) > 0
    assert _num(r"its first run in a new session {n} s", out) > 0 and _num(r"x its speed warm, {n}x in a new", out) > 0
    assert _num(r"MinHash stage seconds \(fast shingle hash\): sign {n}", out) > 0
    assert "whole prepare job" not in out  # --skip-job


def test_bench_dedup_refuses_bad_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    from haina.tools.bench.dedup import main

    for bad in ("ten", "100,0", ","):
        with pytest.raises(SystemExit) as info:
            main(["--docs", bad, "--skip-job", "--skip-stage"])
        assert info.value.code == 2 and "--docs" in capsys.readouterr().err


@pytest.mark.integration  # two `haina pretrain` runs, one under torchrun
@pytest.mark.timeout(300)
def test_bench_layouts_dp_shard_matches_one_process(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`--only dp_shard=2 --steps 2`: one process and dp_shard=2, with step times and a loss and gradient
    norm within 1e-4 of one process (0 for one process itself)."""
    from haina.tools.bench.layouts import main

    main(["--steps", "2", "--only", "dp_shard=2"])
    out = capsys.readouterr().out
    rows = {m.group(1).strip(): [float(m.group(i)) for i in (2, 3, 4, 5)] for m in
            re.finditer(r"^(\S.*?)\s+(\d+)\s+([\d.]+)\s+([\d.e+-]+)\s+([\d.e+-]+)$", out, re.M)}
    assert set(rows) == {"1 process", "dp_shard=2"}, out
    assert rows["1 process"] == [1, rows["1 process"][1], 0.0, 0.0]
    procs, ms, loss, grad = rows["dp_shard=2"]
    assert procs == 2 and ms > 0 and rows["1 process"][1] > 0
    assert loss < 1e-4 and grad < 1e-4


def test_bench_layouts_refuses_a_single_untimed_step(capsys: pytest.CaptureFixture[str]) -> None:
    from haina.tools.bench.layouts import main

    with pytest.raises(SystemExit) as info:
        main(["--steps", "1"])
    assert info.value.code == 2 and "--steps must be at least 2" in capsys.readouterr().err


def test_bench_logprobs_lean_needs_less_memory(capsys: pytest.CaptureFixture[str]) -> None:
    """Chunked per-token log-probs and entropy: the same values as full logits in a fraction of the memory."""
    from haina.tools.bench.logprobs import main

    r = main(["--vocab", "16384", "--tokens", "512", "--hidden", "32", "--chunk", "32"])
    assert 0 < r["lean_peak_bytes"] * 3 < r["full_peak_bytes"], r
    assert r["max_logp_diff"] < 1e-4 and r["max_entropy_diff"] < 1e-4
    assert "ratio" in capsys.readouterr().out


@pytest.mark.integration  # a Spark session (local[2])
@pytest.mark.timeout(300)
def test_bench_cluster_components_chain_and_star(spark) -> None:  # noqa: F811
    """The connected-components half of bench.cluster at its smallest: a chain needs about log2(n) rounds
    (pointer jumping), a star one, both far inside the round limit, and each is one component."""
    from haina.tools.bench.cluster import main

    result = main(["--skip-cluster", "--nodes", "3000", "--json"])
    rows = {r["shape"]: r for r in result["components"]}
    assert all(r["one_component"] and r["nodes"] == 3000 for r in rows.values()), rows
    assert 8 <= rows["chain"]["rounds"] <= 16 < rows["chain"]["limit"]  # log2(3000) = 11.6
    assert rows["star"]["rounds"] <= 2


def test_bench_dedup_remixes_real_sentences() -> None:
    """Past the installed text's documents the corpus goes on with remixes of its sentences: documents of
    the usual size, made of the pool's sentences, not near-duplicates of one another."""
    import random

    from haina.data_spark.minhash import shingles
    from haina.tools.bench.dedup import _DOC_CHARS, _remixes, jaccard

    pool = [f"Sentence number {i} talks about topic {i % 97} and then stops here." for i in range(2000)]
    docs = [doc for doc, _ in zip(_remixes(random.Random(0), pool), range(50), strict=False)]
    assert all(_DOC_CHARS[0] <= len(d.replace("\n", " ")) + 2 for d in docs)
    assert all(len(d) < 2 * _DOC_CHARS[1] for d in docs)
    assert all(" ".join(d.split()).count("Sentence number") >= 4 for d in docs)
    assert max(jaccard(a, b, 5) for a, b in zip(docs, docs[1:], strict=False)) < 0.3
    assert len(set(shingles(docs[0], 5))) > 20
