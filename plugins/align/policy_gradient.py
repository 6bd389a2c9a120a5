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
from haina.core.config import ConfigError, plugin_settings
from haina.core.model import META, build_model
from haina.core.tokenizer import load_tokenizer
from haina.plugins.align.advantages import LossAggregation, clipped_policy_loss, sequence_kl
from haina.plugins.align.common import check_layout
from haina.plugins.align.packing import model_inputs
from haina.plugins.align.preference_data import PromptBatches, read_prompts
from haina.plugins.align.rl import tokens_per_rank
from haina.plugins.align.rollout import (
    RLSettings,
    Rollout,
    check_rl_settings,
    make_generator,
    mini_batch_rows,
    per_position,
    sample_rollout,
)
from haina.plugins.align.token_logprobs import model_token_logps, trained_token_logps
from haina.plugins.rewards.base import RewardSpec, sync_over_tp
from haina.plugins.rewards.combine import build_reward

if TYPE_CHECKING:
    from haina.core.config import HainaConfig
    from haina.core.engine import Engine

__all__ = ["CriticFreeAlgorithm", "CriticFreeSettings", "RolloutScores"]


class CriticFreeSettings(RLSettings):
    """Settings every critic-free algorithm has; each algorithm's own class sets its paper's defaults."""

    reward: RewardSpec = Field(
        default_factory=list, description="Reward terms, required: a reward plugin, or a list of {type, name, "
        "weight, <settings>} summed (see haina.plugins.rewards.base).",
    )
    n_samples: int = Field(4, gt=0, description="Responses sampled per prompt (the group).")
    beta: float = Field(0.0, ge=0, description="KL coefficient (0: no reference model is loaded).")
    loss_agg: LossAggregation = Field("token_mean", description="How per-token losses become one number.")


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
        check_rl_settings(cfg, own, cls.name, own.n_samples)

    def __init__(self, cfg: HainaConfig) -> None:
        super().__init__(cfg)
        self.tokenizer = load_tokenizer(cfg)
        self.reward = build_reward(self.settings.reward, cfg, f"{cfg.algorithm}.reward")
        self.reference: nn.Module | None = None
        self.generator = make_generator(self.settings.generator, cfg, self.tokenizer, f"{cfg.algorithm}.generator")
        vocab = self.tokenizer.vocab_size
        self.vocab_limit = vocab if vocab < cfg.model.vocab_size else None

    def setup(self, engine: Engine, resumed: bool) -> None:
        super().setup(engine, resumed)  # the actor from align.init_from
        if self.settings.beta > 0:
            source = self.settings.reference or self.cfg.align.init_from
            self.reference = engine.prepare_frozen(build_model(self.cfg, META), source)
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

    def _logp_options(self) -> dict[str, Any]:
        return {"temperature": self.settings.sampling.logp_temperature, "vocab_limit": self.vocab_limit}

    def _rollout_logps(self, engine: Engine, model: nn.Module | None, roll: Rollout) -> torch.Tensor:
        """[b, T] log-probabilities of the rollout under the trained model (``model`` None) or a frozen one,
        ``rollout_micro_batch`` rows at a time, packed when ``pack`` is set."""
        chunk, p = self.cfg.loss.chunk_size, self.settings

        def logps(x: Any) -> torch.Tensor:
            if model is None:
                return trained_token_logps(engine, x.tokens, x.targets, chunk, positions=x.positions,
                                           segments=x.segments, **self._logp_options()).logp
            return model_token_logps(model, x.tokens, x.targets, chunk, positions=x.positions, segments=x.segments,
                                     **self._logp_options()).logp

        return per_position(logps, roll.tokens, roll.targets, roll.lengths, p.rollout_micro_batch, p.pack)

    @torch.no_grad()
    def score_rollout(
        self, engine: Engine, step: int, prompts: list[list[int]], items: list[dict[str, Any]],
        positions: list[int],
    ) -> tuple[RolloutScores, dict[str, float]]:
        """Sample, score, and take the log-probabilities the step needs from the models as they are now."""
        p = self.settings
        roll = sample_rollout(
            engine, self.generator, engine.parts[0], prompts, items, p.sampling, tokenizer=self.tokenizer,
            seq_len=self.cfg.train.seq_len, seed=self.cfg.train.seed + 100_003 * step, positions=positions,
            n_samples=p.n_samples, micro_batch=p.rollout_micro_batch,
        )
        with engine.autocast:
            needs_old = p.epochs > 1 or p.mini_batches > 1 or self.kl_in_reward()
            old_logp = self._rollout_logps(engine, None, roll) if needs_old else None
            ref_logp = self._rollout_logps(engine, self.reference, roll) if self.reference is not None else None
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
        first_logp = torch.zeros_like(roll.gen_logp)
        entropy_sum = torch.zeros((), device=roll.mask.device)
        for epoch in range(p.epochs):
            for rows in mini_batch_rows(roll.mask.shape[0], p.mini_batches, self.cfg.train.seed + 7919 * step + epoch):
                rows = rows.to(roll.mask.device)
                mask = roll.mask[rows]
                inputs = model_inputs(roll.tokens[rows], roll.targets[rows], roll.lengths[rows], p.pack)
                tokens = tokens_per_rank(mask)  # token means over the whole mini-batch, on any layout
                engine.zero_grad()
                with engine.autocast:
                    new = trained_token_logps(
                        engine, inputs.tokens, inputs.targets, self.cfg.loss.chunk_size, entropy=epoch == 0,
                        positions=inputs.positions, segments=inputs.segments, **self._logp_options(),
                    )
                    logp = inputs.unpack(new.logp)
                    old = scored.old_logp[rows] if scored.old_logp is not None else logp.detach()
                    ref = scored.ref_logp[rows] if scored.ref_logp is not None else None
                    loss, stats = clipped_policy_loss(
                        logp, old, advantages[rows], mask, p.clip, p.loss_agg, kl=self.loss_kl(logp, ref),
                        beta=p.beta, tokens=tokens,
                    )
                engine.backward(loss)
                grad_norm = engine.optimizer_step()
                if epoch == 0:
                    first_logp[rows] = logp.detach()
                    entropy_sum = entropy_sum + (inputs.unpack(new.entropy).detach() * mask).sum()
        metrics["entropy"] = float(entropy_sum / roll.mask.sum().clamp(min=1))
        train_s = time.perf_counter() - start
        rollout_logp = scored.old_logp if scored.old_logp is not None else first_logp
        if scored.ref_logp is not None:
            metrics["kl"] = float(sequence_kl(rollout_logp, scored.ref_logp, roll.mask).mean())
        mask = roll.mask.float()
        metrics["generator_logp_gap"] = float(((roll.gen_logp - rollout_logp).abs() * mask).sum() / mask.sum().clamp(min=1))
        metrics.update({k: float(v) for k, v in stats.items()})
        n_rows = len(roll.replies)
        metrics.update(
            loss=float(loss.detach()), grad_norm=grad_norm, response_length=roll.new_tokens / n_rows,
            truncated=1.0 - sum(roll.finished) / n_rows,
            rollout_tokens_per_s=roll.new_tokens / max(roll.rollout_s, 1e-9),
            train_tokens_per_s=int(roll.mask.sum()) * p.epochs / max(train_s, 1e-9),
        )
        return metrics
