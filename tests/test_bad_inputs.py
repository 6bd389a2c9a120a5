"""Bad training inputs fail before the first step, in one line with exit status 2 (issue 20): a tokenizer
that does not fit the model or cannot be read, damaged ``.bin``/``.idx`` files; and the sample-index cache
survives a build that was killed half-way."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from haina.core.algorithm import check_algorithm
from haina.core.config import DataConfig
from haina.core.data import PretrainBatches
from haina.core.files import MANIFEST, verify_manifest
from haina.core.indexed_dataset import check_indexed_dataset
from haina.core.tokenizer import check_tokenizers
from haina.tools.cli import run
from tests.conftest import one_line_error, tiny_config
from tests.parallel_helpers import run_pretrain

_HEAD = struct.Struct("<9sQBQQ")


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A SentencePiece model of about 300 pieces (fewer than the tiny preset's 512 rows) and its size."""
    folder = tmp_path_factory.mktemp("tok")
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnop"), size=int(rng.integers(2, 7)))) for _ in range(400)]
    (folder / "text.txt").write_text("\n".join(" ".join(rng.choice(words, size=12)) for _ in range(2000)))
    spm.SentencePieceTrainer.train(
        input=str(folder / "text.txt"), model_prefix=str(folder / "tok"), vocab_size=300, model_type="bpe",
        hard_vocab_limit=False, minloglevel=2,
    )
    model = folder / "tok.model"
    return model, spm.SentencePieceProcessor(model_file=str(model)).get_piece_size()


def _cli_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run the CLI in-process; it must exit 2 with exactly one line on stderr, which is returned."""
    assert run(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err, err
    return err


# ------------------------------------------------------------------------------------------ tokenizers

def test_tokenizer_with_more_pieces_than_rows_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_data: Path, small_tokenizer: tuple[Path, int],
) -> None:
    model, pieces = small_tokenizer
    rows = 256
    err = _cli_error(
        capsys, "pretrain", "--config", "tiny", f"train.run_dir={tmp_path}", f"data.prefixes=[{tiny_data}]",
        f"data.tokenizer={model}", f"model.vocab_size={rows}",
    )
    assert err.startswith(f"haina pretrain: error: data.tokenizer: {model} has {pieces} pieces but model.vocab_size is {rows}")
    assert not (tmp_path / "checkpoints").exists()  # refused before any work


@pytest.mark.parametrize("algorithm", ["sft", "rm", "dpo", "ppo"])
def test_every_algorithm_checks_its_tokenizer(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, small_tokenizer: tuple[Path, int], algorithm: str,
) -> None:
    model, pieces = small_tokenizer
    err = _cli_error(
        capsys, algorithm, "--config", "tiny", f"train.run_dir={tmp_path}", f"align.data={tmp_path / 'x.jsonl'}",
        f"align.tokenizer={model}", "model.vocab_size=128",
    )
    assert f"error: align.tokenizer: {model} has {pieces} pieces but model.vocab_size is 128" in err


def test_fewer_pieces_than_rows_trains_with_a_note(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_data: Path, small_tokenizer: tuple[Path, int],
) -> None:
    model, pieces = small_tokenizer
    cfg = tiny_config(tmp_path, tiny_data, f"data.tokenizer={model}")
    check_algorithm(cfg)
    assert capsys.readouterr().err == ""  # nothing before the run starts: a later refusal stays one line
    assert check_tokenizers(cfg) == [
        f"data.tokenizer {model} has {pieces} pieces for model.vocab_size 512: "
        f"{512 - pieces} embedding rows are never used"
    ]


@pytest.mark.parametrize("kind", ["missing", "garbage"])
def test_unreadable_tokenizer_names_the_field(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_data: Path, kind: str,
) -> None:
    model = tmp_path / "tok.model"
    if kind == "garbage":
        model.write_bytes(b"this is not a protobuf" * 10)
    err = _cli_error(
        capsys, "pretrain", "--config", "tiny", f"train.run_dir={tmp_path / 'run'}", f"data.prefixes=[{tiny_data}]",
        f"data.tokenizer={model}",
    )
    expected = "tokenizer model not found" if kind == "missing" else "not a SentencePiece model ("
    assert err.startswith(f"haina pretrain: error: data.tokenizer: {model}: {expected}")
    err = _cli_error(capsys, "sft", "--config", "tiny", f"align.data={tmp_path / 'x.jsonl'}", f"align.tokenizer={model}")
    assert err.startswith(f"haina sft: error: align.tokenizer: {model}: {expected}")


# ---------------------------------------------------------------------------------------- .bin / .idx

def _copy_data(tiny_data: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for suffix in (".bin", ".idx"):
        shutil.copy(f"{tiny_data}{suffix}", folder / f"tiny{suffix}")
    return folder / "tiny"


def test_truncated_bin_is_refused_through_the_cli(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_data: Path,
) -> None:
    prefix = _copy_data(tiny_data, tmp_path / "data")
    bin_path = Path(f"{prefix}.bin")
    size = bin_path.stat().st_size
    os.truncate(bin_path, size // 3)
    err = _cli_error(capsys, "pretrain", "--config", "tiny", f"train.run_dir={tmp_path / 'run'}", f"data.prefixes=[{prefix}]")
    assert err.startswith(f"haina pretrain: error: data.prefixes: {bin_path}: {size // 3} bytes, but tiny.idx describes")
    assert f"({size} bytes): truncated" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_garbage_idx_is_refused_through_the_cli(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_data: Path,
) -> None:
    prefix = _copy_data(tiny_data, tmp_path / "data")
    Path(f"{prefix}.idx").write_bytes(os.urandom(4096))
    err = _cli_error(capsys, "pretrain", "--config", "tiny", f"train.run_dir={tmp_path / 'run'}", f"data.prefixes=[{prefix}]")
    assert err == f"haina pretrain: error: data.prefixes: {prefix}.idx: not a Megatron index (no MMIDIDX header) " \
        "(re-make it with `haina data tokenize`)"


def test_garbage_idx_is_refused_by_the_launcher_before_torchrun(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--nproc-per-node 2``: the launcher checks the files itself, so the line and exit 2 come from it."""
    import haina.tools.cli as cli

    monkeypatch.setattr(cli, "_torchrun", lambda *a, **k: pytest.fail("torchrun started"))
    prefix = _copy_data(tiny_data, tmp_path / "data")
    Path(f"{prefix}.idx").write_bytes(os.urandom(4096))
    err = _cli_error(capsys, "pretrain", "--nproc-per-node", "2", "--config", "tiny",
                     f"train.run_dir={tmp_path / 'run'}", f"data.prefixes=[{prefix}]")
    assert "not a Megatron index (no MMIDIDX header)" in err


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _damage(prefix: Path, kind: str) -> str:
    """Damage the copy at ``prefix`` one way; returns what the message must say."""
    idx, bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    _, _, _, sequences, documents = _HEAD.unpack(idx.read_bytes()[:_HEAD.size])
    if kind == "version":
        _patch(idx, 9, struct.pack("<Q", 2))
        return "index version 2, expected 1"
    if kind == "dtype":
        _patch(idx, 17, struct.pack("<B", 42))
        return "unknown token dtype code 42"
    if kind == "counts":
        _patch(idx, 18, struct.pack("<Q", sequences * 1000))
        return f"but its header's {sequences * 1000} sequences and {documents} document boundaries need"
    if kind == "short_idx":
        os.truncate(idx, idx.stat().st_size - 8)
        return "(truncated, or the counts are garbage)"
    if kind == "bounds":
        _patch(idx, _HEAD.size + 12 * sequences + 8 * (documents - 1), struct.pack("<q", sequences + 5))
        return f"document boundaries do not rise from 0 to the sequence count {sequences}"
    if kind == "pointer":
        _patch(idx, _HEAD.size + 4 * sequences + 8 * 7, struct.pack("<q", 3))
        return "sequence 7 does not start where the one before it ends"
    if kind == "long_bin":
        with open(bin_path, "ab") as f:
            f.write(b"\0\0")
        return "longer than its index says"
    if kind == "empty_idx":
        idx.write_bytes(b"")
        return "not a Megatron index"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["version", "dtype", "counts", "short_idx", "bounds", "pointer", "long_bin", "empty_idx"],
)
def test_damaged_index_pairs_are_refused(tmp_path: Path, tiny_data: Path, kind: str) -> None:
    check_indexed_dataset(tiny_data)  # the fixture's own files pass
    prefix = _copy_data(tiny_data, tmp_path)
    expected = _damage(prefix, kind)
    message = one_line_error(check_indexed_dataset, prefix, "data.blend")
    assert message.startswith("data.blend: ") and expected in message
    assert f"{prefix}.bin" in message if kind == "long_bin" else f"{prefix}.idx" in message


def test_missing_half_of_a_pair_is_refused(tmp_path: Path, tiny_data: Path) -> None:
    prefix = _copy_data(tiny_data, tmp_path)
    Path(f"{prefix}.idx").unlink()
    assert one_line_error(check_indexed_dataset, prefix) == (
        f"data.prefixes: {prefix}.idx does not exist (make it with `haina data tokenize`)"
    )


# ---------------------------------------------------------------------------------- sample-index cache

def _batches(data: Path, cache_dir: Path, num_samples: int = 40) -> PretrainBatches:
    return PretrainBatches(
        DataConfig(prefixes=[str(data)]), seq_len=64, micro_batch_size=2, num_samples=num_samples, seed=1,
        eod=2, vocab_size=512, cache_dir=cache_dir,
    )


def _shuffle_index(cache_dir: Path) -> Path:
    (path,) = cache_dir.glob("*-shuffle_index.npy")
    return path


def test_cache_is_published_whole_and_reused(tmp_path: Path, tiny_data: Path) -> None:
    cache = tmp_path / "data_cache"
    first = _batches(tiny_data, cache).batch(3)
    verify_manifest(cache)
    inode = _shuffle_index(cache).stat().st_ino
    again = _batches(tiny_data, cache).batch(3)  # a hit: the published files stay as they are
    assert all((a == b).all() for a, b in zip(first, again, strict=True))
    assert _shuffle_index(cache).stat().st_ino == inode
    _batches(tiny_data, cache, num_samples=80)  # another build joins the published ones
    assert len(list(cache.glob("*-shuffle_index.npy"))) == 2
    verify_manifest(cache)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data_cache"]  # no staging folder left behind


@pytest.mark.parametrize("manifest", [True, False], ids=["published", "written-in-place-before"])
def test_truncated_cache_is_rebuilt(
    caplog: pytest.LogCaptureFixture, tmp_path: Path, tiny_data: Path, manifest: bool,
) -> None:
    """A build killed while ``*-shuffle_index.npy`` was written (or a cache file cut short afterwards),
    plus the staging folder a killed build leaves: the next builder rebuilds and gives the same batches."""
    cache = tmp_path / "data_cache"
    expected = _batches(tiny_data, cache).batch(5)
    shuffle = _shuffle_index(cache)
    size = shuffle.stat().st_size
    os.truncate(shuffle, size // 2)
    if not manifest:  # what megatron's in-place writes left before haina published the cache
        (cache / MANIFEST).unlink()
    leftover = tmp_path / ".data_cache.tmp"
    leftover.mkdir()
    (leftover / shuffle.name).write_bytes(b"\x93NUMPY cut short")
    with caplog.at_level("WARNING", logger="haina.data"):
        rebuilt = _batches(tiny_data, cache).batch(5)
    assert all((a == b).all() for a, b in zip(expected, rebuilt, strict=True))
    assert shuffle.stat().st_size == size and np.load(shuffle, mmap_mode="r").shape[0] > 0
    verify_manifest(cache)
    assert not leftover.exists()
    assert any("is rebuilt" in r.getMessage() for r in caplog.records)


@pytest.mark.integration
def test_training_restarts_after_a_killed_cache_build(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_data: Path, small_tokenizer: tuple[Path, int],
) -> None:
    """Through the CLI: a run whose cache was cut short and whose staging folder was left behind trains
    again, under two ranks (rank 0 rebuilds into the staging folder, rank 1 reads it there). The first run
    also shows that a tokenizer with fewer pieces than rows trains, with a note."""
    run_dir = tmp_path / "run"
    argv = ["pretrain", "--config", "tiny", f"train.run_dir={run_dir}", f"data.prefixes=[{tiny_data}]", "train.steps=2"]
    assert run([*argv, f"data.tokenizer={small_tokenizer[0]}"]) == 0
    assert "haina: note: data.tokenizer" in capsys.readouterr().err
    shuffle = _shuffle_index(run_dir / "data_cache")
    os.truncate(shuffle, shuffle.stat().st_size // 2)
    (run_dir / ".data_cache.tmp").mkdir()
    (run_dir / ".data_cache.tmp" / shuffle.name).write_bytes(b"cut short")
    records = run_pretrain(run_dir, tiny_data, 2, "train.steps=2", "train.resume=false")
    assert [r["step"] for r in records] == [1, 2]
    verify_manifest(run_dir / "data_cache")
    assert not (run_dir / ".data_cache.tmp").exists()
