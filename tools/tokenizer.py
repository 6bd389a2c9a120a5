"""SentencePiece BPE tokenizer with the Baichuan 2 settings: training and the compression report.

The settings follow the Baichuan 2 report: raw text in (identity normalization, no dummy prefix, no
whitespace squeezing) so that every string comes back exactly; digits split one by one so numbers get a
uniform treatment; byte fallback so no character is ever ``<unk>``; whitespace runs as pieces so code
indentation is cheap.

SentencePiece reads one sentence per line, so documents are fed line by line and the newline becomes a
user-defined piece: the model never learns pieces across lines, but every newline is one token and
round-trips.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sentencepiece as spm

from haina.core.errors import ConfigError, InputFileError
from haina.core.tokenizer import SPACE, Tokenizer
from haina.data_spark.tokenize import document_format, iter_documents

if TYPE_CHECKING:
    from haina.core.config import TokenizerConfig

# SentencePiece's visible space. It stands for " " inside pieces, so whitespace pieces are spelled with it.
NEWLINE_PIECES = ("\n",)
TAB_PIECES = ("\t", "\t\t")
# Lines longer than this (characters) are cut for training: SentencePiece silently skips long sentences.
_TRAIN_LINE_CHARS = 4096
_MAX_SENTENCE_BYTES = 4 * _TRAIN_LINE_CHARS


def whitespace_symbols(space_runs: Sequence[int]) -> list[str]:
    """User-defined pieces for whitespace: space runs (spelled with ``▁``), tabs, newline."""
    runs = sorted({n for n in space_runs if n >= 2})
    return [SPACE * n for n in runs] + list(TAB_PIECES) + list(NEWLINE_PIECES)


def user_defined_symbols(cfg: TokenizerConfig) -> list[str]:
    """Every user-defined piece, in id order right after unk/bos/eos."""
    return [*whitespace_symbols(cfg.whitespace_pieces), cfg.user_token, cfg.assistant_token]


def _is_plain_text(path: Path) -> bool:
    return document_format(path) is None


def iter_texts(path: Path, text_key: str = "text") -> Iterator[str]:
    """Documents of a JSONL/Parquet file; any other file is UTF-8 text, streamed line by line."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: input file not found")
    if _is_plain_text(path):
        try:
            with open(path, encoding="utf-8", newline="") as handle:
                yield from handle
        except UnicodeDecodeError as exc:
            raise InputFileError(f"{path}: not UTF-8 text and not JSONL/Parquet ({exc.reason})") from None
        return
    for record in iter_documents(path, text_key):
        if record[text_key]:
            yield record[text_key]


def _training_lines(texts: Iterable[str]) -> Iterator[str]:
    """One SentencePiece sentence per line of each document; very long lines are cut, never dropped."""
    for text in texts:
        for line in text.split("\n"):
            if not line:
                continue
            for start in range(0, len(line), _TRAIN_LINE_CHARS):
                yield line[start : start + _TRAIN_LINE_CHARS]


def train_tokenizer(inputs: list[Path], model_prefix: Path, cfg: TokenizerConfig) -> Path:
    """Train a Baichuan 2-style BPE model to ``model_prefix.model`` (and ``.vocab``); returns the model path.

    Inputs are JSONL/Parquet (``text`` field) or plain text files. The same inputs, config, seed and
    prefix give a byte-identical model. A vocabulary too small for the characters the coverage demands
    fails with a :class:`ConfigError` that says so, rather than SentencePiece's internal check message.
    """
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise ConfigError("no tokenizer training input given")
    for path in inputs:
        if not path.is_file():
            raise InputFileError(f"{path}: input file not found")
    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    symbols = user_defined_symbols(cfg)
    if len(set(symbols)) != len(symbols):
        raise ConfigError(f"tokenizer user-defined pieces repeat: {symbols}")

    # The sentence file's path is recorded in the model, so it is derived from the prefix (not a random
    # temporary name) to keep the model byte-identical across runs.
    corpus = model_prefix.with_name(f".{model_prefix.name}.sentences.txt")
    try:
        lines = 0
        with open(corpus, "w", encoding="utf-8", newline="\n") as out:
            for path in inputs:
                for line in _training_lines(iter_texts(path)):
                    out.write(line)
                    out.write("\n")
                    lines += 1
        if lines == 0:
            raise InputFileError(f"no text in tokenizer inputs: {', '.join(map(str, inputs))}")
        spm.set_random_generator_seed(cfg.seed)
        options: dict[str, Any] = {
            "input": str(corpus),
            "model_prefix": str(model_prefix),
            "model_type": "bpe",
            "vocab_size": cfg.vocab_size,
            "character_coverage": cfg.character_coverage,
            "max_sentencepiece_length": cfg.max_piece_length,
            "max_sentence_length": _MAX_SENTENCE_BYTES,
            "input_sentence_size": cfg.input_sentence_size,
            "shuffle_input_sentence": True,
            "normalization_rule_name": "identity",
            "add_dummy_prefix": False,
            "remove_extra_whitespaces": False,
            "split_digits": True,
            "byte_fallback": True,
            "allow_whitespace_only_pieces": True,
            "user_defined_symbols": symbols,
            "unk_id": 0,
            "bos_id": 1,
            "eos_id": 2,
            "pad_id": -1,
            # A small corpus may not support vocab_size merges; stop early instead of failing.
            "hard_vocab_limit": False,
            "num_threads": max(1, min(16, os.cpu_count() or 1)),
            "minloglevel": 2,
        }
        try:
            spm.SentencePieceTrainer.train(**options)
        except RuntimeError as exc:
            raise _training_error(exc, cfg) from None
    finally:
        corpus.unlink(missing_ok=True)
    return Path(f"{model_prefix}.model")


def _training_error(exc: RuntimeError, cfg: TokenizerConfig) -> Exception:
    message = str(exc)
    if "Vocabulary size is smaller than required_chars" in message:
        # e.g. "... required_chars. 300 vs 359. Increase vocab_size ..."
        need = message.split("required_chars.")[-1].split(".")[0].strip()
        return ConfigError(
            f"tokenizer vocab_size {cfg.vocab_size} is too small for this corpus ({need} = vocab vs pieces "
            f"required by character_coverage {cfg.character_coverage}); raise vocab_size or lower the coverage"
        )
    return RuntimeError(f"SentencePiece training failed: {message.splitlines()[0] if message else exc}")


# ---------------------------------------------------------------------------------- compression

def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def _stats(documents: int, nbytes: int, tokens: int) -> dict[str, float | int]:
    return {
        "documents": documents,
        "bytes": nbytes,
        "tokens": tokens,
        "tokens_per_byte": _ratio(tokens, nbytes),
        "bytes_per_token": _ratio(nbytes, tokens),
    }


def compression_report(model: Path, heldout: Path, *, text_key: str = "text") -> dict:
    """Tokens per UTF-8 byte of ``heldout`` (lower is better), overall and per ``source`` field.

    JSONL/Parquet are counted per document; a plain text file line by line (the newline is its own
    piece, so this equals encoding the whole file at once).
    """
    tokenizer = Tokenizer(model)
    heldout = Path(heldout)
    if not heldout.is_file():
        raise InputFileError(f"{heldout}: held-out file not found")
    per_source: dict[str | None, list[int]] = {}

    def add(source: str | None, text: str) -> None:
        counts = per_source.setdefault(source, [0, 0, 0])
        counts[0] += 1
        counts[1] += len(text.encode("utf-8"))
        counts[2] += len(tokenizer.encode(text))

    if _is_plain_text(heldout):
        for line in iter_texts(heldout):  # a line is a "document" here
            add(None, line)
    else:
        for record in iter_documents(heldout, text_key, fields=("source",)):
            if record[text_key]:
                source = record["source"]
                add(None if source is None else str(source), record[text_key])
    documents = sum(c[0] for c in per_source.values())
    nbytes = sum(c[1] for c in per_source.values())
    tokens = sum(c[2] for c in per_source.values())
    if nbytes == 0:
        raise InputFileError(f"{heldout}: no text to measure")
    report: dict[str, Any] = {"model": str(model), "heldout": str(heldout), "vocab_size": tokenizer.vocab_size}
    report.update(_stats(documents, nbytes, tokens))
    if any(name is not None for name in per_source):
        names = sorted(per_source, key=lambda name: (name is None, name or ""))
        report["by_source"] = {name or "unknown": _stats(*per_source[name]) for name in names}
    return report


def format_report(report: dict) -> str:
    """A fixed-width table of :func:`compression_report` for terminals and logs."""
    header = f"{'source':<10} {'docs':>8} {'bytes':>12} {'tokens':>12} {'tokens/byte':>12} {'bytes/token':>12}"
    rows = [
        f"tokenizer {report['model']} (vocab {report['vocab_size']:,}) on {report['heldout']}",
        header,
        "-" * len(header),
    ]

    def row(name: str, s: dict) -> str:
        return (
            f"{name:<10} {s['documents']:>8,} {s['bytes']:>12,} {s['tokens']:>12,} "
            f"{s['tokens_per_byte']:>12.4f} {s['bytes_per_token']:>12.3f}"
        )

    for name, stats in report.get("by_source", {}).items():
        rows.append(row(name, stats))
    rows.append(row("all", report))
    return "\n".join(rows)
