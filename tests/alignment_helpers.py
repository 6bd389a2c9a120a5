"""A tokenizer, task data and a short pretraining run for the alignment tests (the verifiable task)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from haina.core.config import TokenizerConfig
from haina.tools.align_data import task
from haina.tools.tokenizer import Tokenizer, train_tokenizer


@dataclass
class AlignmentData:
    folder: Path
    tokenizer: Path
    sft: Path
    pairs: Path
    eval_pairs: Path
    prompts: Path
    pretrain_prefix: Path


def make_alignment_data(folder: Path) -> AlignmentData:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [p["prompt"][0]["content"] + " " + p["answer"] for p in task.make_prompts(3000, 5)]
    (folder / "tok.txt").write_text("\n".join(lines), encoding="utf-8")
    model = train_tokenizer([folder / "tok.txt"], folder / "tok", TokenizerConfig(vocab_size=400, seed=1))
    tok = Tokenizer(model)
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(folder / "pt.bin"), dtype=np.uint16)
    for line in lines[:1500]:
        ids = tok.encode(line) + [tok.eos_id]
        builder.add_document(torch.tensor(ids), [len(ids)])
    builder.finalize(str(folder / "pt.idx"))
    return AlignmentData(
        folder, model,
        task.write_jsonl(task.sft_conversations(200, 1), folder / "sft.jsonl"),
        task.write_jsonl(task.preference_pairs(200, 2), folder / "pairs.jsonl"),
        task.write_jsonl(task.preference_pairs(40, 3), folder / "pairs_eval.jsonl"),
        task.write_jsonl(task.make_prompts(100, 4), folder / "prompts.jsonl"),
        folder / "pt",
    )


def haina(*args: str, nproc: int = 1, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI (under torchrun with ``nproc`` > 1); fails the test with the output on a non-zero exit."""
    command = [sys.executable, "-m", "haina.tools.cli", args[0]]
    if nproc > 1:
        command += ["--nproc-per-node", str(nproc)]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(OMP_NUM_THREADS="1", **(env_extra or {}))
    proc = subprocess.run([*command, *args[1:]], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
