"""``haina eval ppl``: perplexity of a checkpoint (or HF export) per data source and overall.

Each document is scored on its own (no context from the document before it, unlike packed training
sequences), in windows of ``seq_len`` predictions; documents longer than that restart their context at
each window. Losses are summed over tokens, so the overall figure weights sources by their token counts.
The head is applied in chunks of positions, as in training, so the full [tokens, vocab] logits of a
125,696-token vocabulary never exist at once.

Under torchrun the model takes any parallel layout (``parallel.tp=2``, ``parallel.pp=2``, data parallel
over the rest): batches are dealt round-robin to the data-parallel ranks, tensor parallelism scores with
the vocabulary-parallel loss of training, and pipeline stages run forward-only schedules. The sums are
reduced over the world, so the report does not depend on the layout (beyond float rounding).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from haina.core import collectives
from haina.core.config import HainaConfig
from haina.core.data import IGNORE_INDEX
from haina.core.distributed import default_device, init_distributed, is_main_process
from haina.core.errors import ConfigError, InputFileError
from haina.core.files import read_jsonl
from haina.core.indexed_dataset import check_indexed_dataset
from haina.core.model import Transformer
from haina.core.model_loading import ModelSource, open_model
from haina.core.placement import inference_config, place
from haina.core.tokenizer import Tokenizer
from haina.plugins.algorithms.pretrain import Pretrain

CHUNK = 1024


def _jsonl_documents(path: Path, tokenizer: Any, text_key: str) -> Iterator[tuple[str, list[int]]]:
    for where, record in read_jsonl(path):
        text = record.get(text_key)
        if not isinstance(text, str):
            raise InputFileError(f"{where}: not a JSON object with a {text_key!r} field")
        source = str(record.get("source") or path.stem)
        yield source, tokenizer.encode(text) + [tokenizer.eos_id]


def _indexed_documents(prefix: str) -> Iterator[tuple[str, list[int]]]:
    """Documents of a .bin/.idx set (eos already appended by `haina data tokenize`)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    name = Path(prefix).name
    for i in range(len(dataset)):
        yield name, [int(t) for t in dataset[i]]


def read_documents(
    data: Sequence[str], tokenizer_model: str | None, text_key: str = "text"
) -> dict[str, list[list[int]]]:
    """{source: [token ids of each document]} from JSONL files and .bin/.idx prefixes."""
    by_source: dict[str, list[list[int]]] = {}
    tokenizer = None
    for item in data:
        path = Path(item)
        if path.is_file():
            if tokenizer is None:
                if tokenizer_model is None:
                    raise ConfigError(f"{item}: JSONL needs a tokenizer (--tokenizer, or data.tokenizer in the run)")
                tokenizer = Tokenizer(tokenizer_model)
            documents: Iterator[tuple[str, list[int]]] = _jsonl_documents(path, tokenizer, text_key)
        elif Path(item + ".bin").is_file() and Path(item + ".idx").is_file():
            check_indexed_dataset(item, "--data")
            documents = _indexed_documents(item)
        else:
            raise InputFileError(f"--data {item}: neither a JSONL file nor a .bin/.idx prefix")
        for source, ids in documents:
            by_source.setdefault(source, []).append(ids)
    if not any(len(d) > 1 for docs in by_source.values() for d in docs):
        raise InputFileError(f"--data {' '.join(data)}: no document of two or more tokens")
    return by_source


def windows(documents: list[list[int]], seq_len: int) -> list[list[int]]:
    """Each document cut into pieces of seq_len + 1 tokens overlapping by one (seq_len predictions each)."""
    out = []
    for doc in documents:
        for start in range(0, len(doc) - 1, seq_len):
            out.append(doc[start : start + seq_len + 1])
    return out


def pad_batch(pieces: list[list[int]], width: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, labels) [rows, width] of right-padded windows (labels ignored on padding and empty rows)."""
    tokens = torch.zeros(rows, width, dtype=torch.long)
    labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    for row, piece in enumerate(pieces):
        tokens[row, : len(piece) - 1] = torch.tensor(piece[:-1])
        labels[row, : len(piece) - 1] = torch.tensor(piece[1:])
    return tokens, labels


@torch.no_grad()
def nll_sum(model: Transformer, pieces: list[list[int]]) -> tuple[float, int]:
    """(summed negative log-likelihood, predicted tokens) of a batch of windows on one process."""
    tokens, labels = pad_batch(pieces, max(len(p) for p in pieces) - 1, len(pieces))
    device = next(model.parameters()).device
    hidden = model(tokens.to(device)).flatten(0, 1)
    labels = labels.flatten().to(device)
    weight = model.head.effective_weight()
    total = 0.0
    for start in range(0, hidden.shape[0], CHUNK):
        logits = F.linear(hidden[start : start + CHUNK], weight).float()
        total += float(F.cross_entropy(logits, labels[start : start + CHUNK], ignore_index=IGNORE_INDEX, reduction="sum"))
    return total, int((labels != IGNORE_INDEX).sum())


def _stats(nll: float, count: int) -> dict[str, float | int]:
    loss = nll / count if count else float("nan")
    return {"tokens": count, "loss": loss, "ppl": math.exp(loss) if count else float("nan")}


class _Scorer:
    """Summed NLL of a [rows, width] batch on this rank's share of the model; None where this rank
    holds no loss (pipeline stages before the last; tp ranks but the first count once)."""

    def __init__(self, source: ModelSource, cfg: HainaConfig, world: int) -> None:
        cfg.loss.terms = {"cross_entropy": 1.0}
        self.scorer = Pretrain(cfg)
        placed = place(source, cfg, world, stage_loss=self.scorer)
        self.device, self.layout, self.autocast = placed.device, placed.layout, placed.autocast
        self.dp_rank, self.pipeline, self.model = placed.dp_rank, placed.pipeline, placed.model
        self.counts = placed.tp_rank == 0 and (self.pipeline is None or self.pipeline.has_last)
        self.rows = cfg.train.micro_batch_size * self.layout.pp
        self.width_multiple = self.layout.tp if cfg.parallel.sequence_parallel else 1

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, labels: torch.Tensor) -> float | None:
        tokens, labels = tokens.to(self.device), labels.to(self.device)
        if self.pipeline is None:
            with self.autocast:
                out = self.scorer.loss_from_hidden(self.model, self.model(tokens), labels)
            means = [float(out.loss)]
        else:
            losses: list[torch.Tensor] = []
            args = (tokens,) if self.pipeline.has_first else ()
            kwargs = {"target": labels, "losses": losses} if self.pipeline.has_last else {}
            with self.autocast:
                self.pipeline.schedule.eval(*args, **kwargs)
            means = [float(x) for x in losses]
        if not self.counts:
            return None
        counts = [int((chunk != IGNORE_INDEX).sum()) for chunk in labels.chunk(len(means))]
        return sum(m * c for m, c in zip(means, counts, strict=True) if c)


def _batches(by_source: dict[str, list[list[int]]], seq_len: int, rows: int) -> list[tuple[int, list[list[int]]]]:
    """(source index, up to ``rows`` windows) in a fixed order; similar lengths share a batch."""
    out = []
    for index, source in enumerate(sorted(by_source)):
        pieces = sorted(windows(by_source[source], seq_len), key=len)
        out += [(index, pieces[start : start + rows]) for start in range(0, len(pieces), rows)]
    return out


def evaluate_perplexity(
    checkpoint: str | Path,
    data: Sequence[str],
    *,
    tokenizer: str | None = None,
    out: str | Path | None = None,
    batch_size: int = 8,
    seq_len: int | None = None,
    text_key: str = "text",
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Score ``data`` with the model of ``checkpoint`` under the layout of ``overrides`` (any world size
    torchrun gives); write and return the JSON report (written by rank 0)."""
    import os

    if batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}")
    source = open_model(checkpoint)
    cfg = source.cfg
    seq_len = seq_len or cfg.model.max_seq_len
    if not 0 < seq_len <= cfg.model.max_seq_len:
        raise ConfigError(f"--seq-len {seq_len}: must be in 1..{cfg.model.max_seq_len} (the model's max_seq_len)")
    cfg = inference_config(cfg, overrides, batch_size, "eval ppl")
    cfg.train.seq_len = seq_len
    by_source = read_documents(data, tokenizer or cfg.data.tokenizer, text_key)
    too_big = max((t for docs in by_source.values() for d in docs for t in d), default=0)
    if too_big >= cfg.model.vocab_size:
        raise InputFileError(f"--data: token id {too_big} is outside the model's vocabulary ({cfg.model.vocab_size})")
    init_distributed(default_device(), cfg.parallel.collective_timeout_s)
    scorer = _Scorer(source, cfg, int(os.environ.get("WORLD_SIZE", "1")))
    batches = _batches(by_source, seq_len, scorer.rows)
    dp = scorer.layout.dp
    rounds = -(-len(batches) // dp)  # every rank runs as many forwards (collectives must pair up)
    sums = torch.zeros(len(by_source), 2, dtype=torch.float64)
    for r in range(rounds):
        i = r * dp + scorer.dp_rank
        index, pieces = batches[i] if i < len(batches) else (0, [])
        width = seq_len if scorer.pipeline is not None else max((len(p) - 1 for p in pieces), default=1)
        width = -(-width // scorer.width_multiple) * scorer.width_multiple
        tokens, labels = pad_batch(pieces, width, scorer.rows if scorer.pipeline is not None else max(len(pieces), 1))
        nll = scorer(tokens, labels)
        if nll is not None and pieces:
            sums[index] += torch.tensor([nll, float((labels != IGNORE_INDEX).sum())], dtype=torch.float64)
    sums = collectives.reduce_values(sums)
    sources = {name: _stats(float(n), int(c)) for name, (n, c) in zip(sorted(by_source), sums.tolist(), strict=True)}
    total = sums.sum(0).tolist()
    report = {
        "checkpoint": str(checkpoint),
        "data": list(data),
        "seq_len": seq_len,
        "layout": scorer.layout.describe(),
        "sources": sources,
        "overall": _stats(total[0], int(total[1])),
    }
    out_path = Path(out) if out is not None else Path(checkpoint) / "ppl.json"
    if is_main_process():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=2), encoding="utf-8")
    report["out"] = str(out_path)
    return report


def format_table(report: dict[str, Any]) -> str:
    """Plain-text table: one row per source, then the overall row."""
    rows = [*report["sources"].items(), ("overall", report["overall"])]
    width = max(8, *(len(name) for name, _ in rows))
    lines = [f"{'source':<{width}}  {'tokens':>10}  {'loss':>8}  {'ppl':>10}"]
    for name, s in rows:
        lines.append(f"{name:<{width}}  {s['tokens']:>10}  {s['loss']:>8.4f}  {s['ppl']:>10.3f}")
    if "out" in report:
        lines.append(f"written to {report['out']}")
    return "\n".join(lines)
