"""RL makes the policy better where it matters: the alignment demo's GRPO stage, shortened, raises the
verified-answer rate on held-out prompts, measured by the demo's own evaluation.

The setting is the demo's: SFT conversations in which a share of the letter counts is one too many (an
annotator's systematic error imitation learns), then GRPO with the task's verifier as the only reward. At
this size (the tiny preset, 20 GRPO steps) three seeds gave verified rates 0.621 -> 0.711 / 0.703 / 0.684,
a rise of 0.063 to 0.090 whose seed-to-seed spread is 0.027; the test asks seed 0 for a rise of 0.045,
above that spread and below the smallest rise seen.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from haina.core.config import alignment_config, load_config
from haina.core.train import train
from haina.tools.align_data import task
from haina.tools.demo.align import VERIFIER, evaluate_policy
from tests.alignment_helpers import make_alignment_data

pytestmark = pytest.mark.integration  # three training runs and generation, in one process

SHORT = ("train.micro_batch_size=16", "train.log_every=50", "train.save_every=1000")


@pytest.mark.timeout(600)
def test_grpo_with_the_verifier_raises_verified_answers(tmp_path: Path) -> None:
    data = make_alignment_data(tmp_path / "data")
    sft_data = task.write_jsonl(task.sft_conversations(400, 1, miscount=0.6), tmp_path / "sft.jsonl")
    train(load_config("tiny", [
        f"train.run_dir={tmp_path / 'pt'}", f"data.prefixes=[{data.pretrain_prefix}]", f"data.tokenizer={data.tokenizer}",
        "model.vocab_size=400", "train.steps=150", *SHORT,
    ]))
    sft = tmp_path / "pt-sft"
    train(alignment_config("sft", str(tmp_path / "pt"), None, [f"align.data={sft_data}", "train.steps=150", *SHORT]))
    prompts = task.write_jsonl(task.make_prompts(200, 4), tmp_path / "prompts.jsonl")
    grpo = tmp_path / "grpo"
    train(alignment_config("grpo", str(sft), None, [
        f"train.run_dir={grpo}", f"align.data={prompts}", "train.seed=0", "train.steps=20", "optim.lr=1e-4",
        "optim.min_lr=1e-4", "optim.warmup_steps=0", "optim.clip_grad=0.5", "train.global_batch_size=16",
        "grpo.sampling.max_new_tokens=6", "grpo.sampling.top_k=20", f"grpo.reward=[{VERIFIER}}}]", *SHORT,
    ]))
    cfg = load_config(str(sft / "config.yaml"))
    heldout = task.write_jsonl(task.make_prompts(256, 5), tmp_path / "heldout.jsonl")
    before = evaluate_policy(cfg, sft, "", None, sft, heldout)
    after = evaluate_policy(cfg, grpo, "", None, sft, heldout)
    assert before["kl"] == 0.0 and 0.0 < after["kl"] < 1.0  # moved from the SFT model, and not far
    assert after["verified"] - before["verified"] >= 0.045, (before, after)
