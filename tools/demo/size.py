"""How big the demo is: the full few-minute run of ``make demo``, or ``--quick``, every stage at the
smallest size that still runs it (seconds of training; what the test of the demo runs)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DemoSize:
    """Corpus megabytes, overrides of each training stage (after the stage's own), and the alignment data
    and evaluation sizes."""

    corpus_mb: float = 4.5
    pretrain: tuple[str, ...] = ()
    sft: tuple[str, ...] = ()
    rm: tuple[str, ...] = ()
    ppo: tuple[str, ...] = ()
    grpo: tuple[str, ...] = ()
    miscount: float = 0.6  # share of the SFT letter counts written one too many (see tools.demo.align)
    sft_conversations: int = 2000
    pairs: int = 1500
    eval_pairs: int = 200
    prompts: int = 400
    pool: int = 800
    heldout_prompts: int = 256
    collect_sample: int = 240


FULL = DemoSize()

QUICK = DemoSize(
    corpus_mb=0.3,
    pretrain=("train.steps=30", "optim.warmup_steps=5", "train.save_every=30", "model.vocab_size=4096",
              "tokenizer.vocab_size=4096"),
    sft=("train.steps=6", "optim.warmup_steps=1"),
    rm=("train.steps=4", "optim.warmup_steps=1"),
    ppo=("train.steps=3", "ppo.critic_warmup_steps=1", "train.micro_batch_size=4", "train.global_batch_size=4"),
    grpo=("train.steps=2", "grpo.n_samples=2", "train.micro_batch_size=2", "train.global_batch_size=2"),
    sft_conversations=200, pairs=100, eval_pairs=20, prompts=40, pool=120, heldout_prompts=8, collect_sample=24,
)
