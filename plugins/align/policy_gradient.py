"""The step the critic-free RL algorithms (grpo, rloo, reinforce_pp) share, and their common settings.

Two models: the actor (trained, from ``align.init_from``) and a frozen reference (only when the KL
coefficient ``beta`` is above 0); rewards come from reward plugins. Each engine step samples ``n_samples``
responses per prompt, scores them, lets the algorithm turn scores (and the KL, where its paper puts it)
into advantages, and takes ``epochs`` updates with PPO's clipped ratio. Log-probabilities come from the
chunked path (:mod:`haina.plugins.align.token_logprobs`), never from full logits. With one epoch the
rollout policy is the policy being updated, so its log-probabilities are not computed twice unless the
algorithm's reward needs them (RLOO and REINFORCE++ put the KL in the reward).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from haina.core.algorithm import Algorithm
from haina.core.config import ConfigError, PluginSettings, plugin_settings
from haina.core.model import build_model
from haina.core.tokenizer import load_tokenizer
from haina.plugins.align.advantages import LossAggregation, clipped_policy_loss, sequence_kl
from haina.plugins.align.common import check_layout
from haina.plugins.align.preference_data import PromptBatches, read_prompts
from haina.plugins.align.rl import tokens_per_rank
from haina.plugins.align.rollout import Rollout, SamplingSettings, sample_rollout
from haina.plugins.align.token_logprobs import TokenLogps, model_token_logps, trained_token_logps
from haina.plugins.rewards.base import RewardSpec, sync_over_tp
from haina.plugins.rewards.combine import build_reward

if TYPE_CHECKING:
    from haina.core.config import HainaConfig
    from haina.core.engine import Engine

__all__ = ["CriticFreeAlgorithm", "CriticFreeSettings", "RolloutScores"]


class CriticFreeSettings(PluginSettings):
    """Settings every critic-free algorithm has; each algorithm's own class sets its paper's defaults."""

    reward: RewardSpec = Field(
        default_factory=list, description="Reward terms, required: a reward plugin, or a list of {type, name, "
        "weight, <settings>} summed (see haina.plugins.rewards.base).",
    )
    reference: str | None = Field(None, description="Frozen reference checkpoint; default: align.init_from.")
    n_samples: int = Field(4, gt=0, description="Responses sampled per prompt (the group).")
    beta: float = Field(0.0, ge=0, description="KL coefficient (0: no reference model is loaded).")
    clip: float = Field(0.2, gt=0, description="PPO ratio clip epsilon.")
    epochs: int = Field(1, gt=0, description="Optimizer steps on each rollout batch.")
    loss_agg: LossAggregation = Field("token_mean", description="How per-token losses become one number.")
    sampling: SamplingSettings = Field(default_factory=SamplingSettings, description="Rollout sampling.")


@dataclass
class RolloutScores:
    """What one rollout gave the algorithm: the batch, its rewards [b] and log-probabilities [b, T]."""

    roll: Rollout
    scores: torch.Tensor
    old_logp: torch.Tensor | None  # the rollout policy's; None when nothing needs it (one epoch, KL not in the reward)
    ref_logp: torch.Tensor | None  # the reference's; None without a reference (beta = 0)


class CriticFreeAlgorithm(Algorithm):
    """Base of grpo, rloo and reinforce_pp; a subclass sets ``name`` and implements :meth:`advantages`."""

    name: ClassVar[str] = ""
    min_samples: ClassVar[int] = 1  # smallest group the advantage is defined for

    @classmethod
    def check_config(cls, cfg: HainaConfig) -> None:
        check_layout(cfg, cls.name)
        if cfg.align.init_from is None:
            raise ConfigError(f"align.init_from: the {cls.name} algorithm needs it")
        own = plugin_settings(cfg, "algorithm", cls.name)
        if not own.reward:
            raise ConfigError(
                f"{cls.name}.reward: the {cls.name} algorithm needs a reward (model, verifier, rules, weighted)"
            )
        if own.n_samples < cls.min_samples:
            raise ConfigError(
                f"{cls.name}.n_samples: the {cls.name} baseline needs at least {cls.min_samples} samples per prompt"
            )
        build_reward(own.reward, cfg, f"{cls.name}.reward")

    def __init__(self, cfg: HainaConfig) -> None:
        super().__init__(cfg)
        self.tokenizer = load_tokenizer(cfg)
        self.reward = build_reward(self.settings.reward, cfg, f"{cfg.algorithm}.reward")
        self.reference: nn.Module | None = None
        vocab = self.tokenizer.vocab_size
        self.vocab_limit = vocab if vocab < cfg.model.vocab_size else None

    def setup(self, engine: Engine, resumed: bool) -> None:
        super().setup(engine, resumed)  # the actor from align.init_from
        if self.settings.beta > 0:
            source = self.settings.reference or self.cfg.align.init_from
            self.reference = engine.prepare_frozen(build_model(self.cfg, engine.device), source)
        self.reward.setup(engine)

    def batches(self, cfg: HainaConfig, run_dir: Path, num_samples: int) -> PromptBatches:
        return PromptBatches(
            read_prompts(cfg.align.data), self.tokenizer, cfg.train.seq_len, cfg.train.micro_batch_size,
            cfg.train.seed,
        )

    # ------------------------------------------------------------------------------ the algorithm's own

    def advantages(self, scored: RolloutScores) -> tuple[torch.Tensor, dict[str, float]]:
        """Advantages [b] (one per response) or [b, T], and metrics of their own."""
        raise NotImplementedError

    def kl_in_reward(self) -> bool:
        """Whether the reward takes the KL of the rollout policy (whose log-probs must then be computed)."""
        return False

    def loss_kl(self, logp: torch.Tensor, ref_logp: torch.Tensor | None) -> torch.Tensor | None:
        """A per-token KL term for the loss (GRPO's); None: the KL is in the reward or nowhere."""
        return None

    # ---------------------------------------------------------------------------------------- the step

    def _logps(self, engine: Engine, roll: Rollout, entropy: bool = False) -> TokenLogps:
        return trained_token_logps(
            engine, roll.tokens, roll.targets, self.cfg.loss.chunk_size,
            temperature=self.settings.sampling.logp_temperature, vocab_limit=self.vocab_limit, entropy=entropy,
        )

    @torch.no_grad()
    def score_rollout(
        self, engine: Engine, step: int, prompts: list[list[int]], items: list[dict[str, Any]],
        positions: list[int],
    ) -> tuple[RolloutScores, dict[str, float]]:
        """Sample, score, and take the log-probabilities the step needs from the models as they are now."""
        p = self.settings
        roll = sample_rollout(
            engine, engine.parts[0], prompts, items, p.sampling, tokenizer=self.tokenizer,
            seq_len=self.cfg.train.seq_len, seed=self.cfg.train.seed + 100_003 * step, positions=positions,
            n_samples=p.n_samples,
        )
        with engine.autocast:
            old_logp = self._logps(engine, roll).logp if (p.epochs > 1 or self.kl_in_reward()) else None
            ref_logp = None
            if self.reference is not None:
                ref_logp = model_token_logps(
                    self.reference, roll.tokens, roll.targets, self.cfg.loss.chunk_size,
                    temperature=p.sampling.logp_temperature, vocab_limit=self.vocab_limit,
                ).logp
            total, parts = self.reward.score_terms(roll.reward_input(self.tokenizer))
        names = list(parts)
        stacked = sync_over_tp(torch.stack([total, *parts.values()]), engine)
        total = stacked[0]
        metrics = {"reward": float(total.mean()), "reward_std": float(total.std()) if len(total) > 1 else 0.0}
        metrics.update({f"reward/{n}": float(v.mean()) for n, v in zip(names, stacked[1:], strict=True)})
        return RolloutScores(roll, total, old_logp, ref_logp), metrics

    def train_step(self, engine: Engine, step: int, micro_batches: list[dict[str, Any]]) -> dict[str, float]:
        p = self.settings
        prompts = [ids for batch in micro_batches for ids in batch["ids"]]
        items = [it for batch in micro_batches for it in batch["items"]]
        positions = [pos for batch in micro_batches for pos in batch["positions"]]
        scored, metrics = self.score_rollout(engine, step, prompts, items, positions)
        roll = scored.roll
        advantages, own = self.advantages(scored)
        metrics.update(own)
        start = time.perf_counter()
        first_logp: torch.Tensor | None = None
        tokens = tokens_per_rank(roll.mask)  # token means over the whole global batch, on any layout
        for epoch in range(p.epochs):
            engine.zero_grad()
            with engine.autocast:
                new = self._logps(engine, roll, entropy=epoch == 0)
                old = scored.old_logp if scored.old_logp is not None else new.logp.detach()
                loss, stats = clipped_policy_loss(
                    new.logp, old, advantages, roll.mask, p.clip, p.loss_agg,
                    kl=self.loss_kl(new.logp, scored.ref_logp), beta=p.beta, tokens=tokens,
                )
            engine.backward(loss)
            grad_norm = engine.optimizer_step()
            if epoch == 0:
                first_logp = new.logp.detach()
                mask = roll.mask.float()
                metrics["entropy"] = float((new.entropy.detach() * mask).sum() / mask.sum().clamp(min=1))
        train_s = time.perf_counter() - start
        if scored.ref_logp is not None:
            rollout_logp = scored.old_logp if scored.old_logp is not None else first_logp
            metrics["kl"] = float(sequence_kl(rollout_logp, scored.ref_logp, roll.mask).mean())
        metrics.update({k: float(v) for k, v in stats.items()})
        n_rows = len(roll.replies)
        metrics.update(
            loss=float(loss.detach()), grad_norm=grad_norm, response_length=roll.new_tokens / n_rows,
            truncated=1.0 - sum(roll.finished) / n_rows,
            rollout_tokens_per_s=roll.new_tokens / max(roll.rollout_s, 1e-9),
            train_tokens_per_s=int(roll.mask.sum()) * p.epochs / max(train_s, 1e-9),
        )
        return metrics
