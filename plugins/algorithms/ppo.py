"""The ``ppo`` algorithm: RLHF with four models, as in the Baichuan 2 report.

Trained: the actor (from ``align.init_from``, an SFT run) and the critic (from ``ppo.reward_model``),
held together in :class:`ActorCritic`. Frozen: the reference (``ppo.reference``, default the actor's
start) and the reward model. Each engine step generates one rollout batch, scores it, turns the score
and a per-token KL penalty against the reference into rewards, estimates advantages with GAE, and takes
``ppo.epochs`` clipped updates on it. During the first ``critic_warmup_steps`` only the critic
learns; the actor gets no gradient, so its weights (and Adam state) stay exactly as loaded.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from pydantic import Field
from torch import nn

from haina.core.algorithm import Algorithm
from haina.core.config import PluginSettings
from haina.core.generate import Sampling, generate
from haina.core.model import Transformer, build_model
from haina.core.registry import register
from haina.core.tokenizer import load_tokenizer
from haina.plugins.algorithms.reward_model import build_value_model, value_config
from haina.plugins.align.common import config_check, shifted_targets, token_logps
from haina.plugins.align.preference_data import PromptBatches, read_prompts, response_mask_from_prompts
from haina.plugins.align.rl import (
    CriticWarmup,
    KLSchedule,
    entropy_from_logits,
    gae,
    kl_penalty_rewards,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)

if TYPE_CHECKING:
    from haina.core.config import HainaConfig
    from haina.core.engine import Engine


class ActorCritic(nn.Module):
    """The two trained models under one module, so one optimizer, one checkpoint (``actor.*``,
    ``critic.*``) and one parallel layout cover both."""

    def __init__(self, cfg: HainaConfig) -> None:
        super().__init__()
        self.actor = Transformer(cfg.model)
        self.critic = Transformer(value_config(cfg))

    def init_weights(self) -> None:
        self.actor.init_weights()
        self.critic.init_weights()


class SamplingSettings(PluginSettings):
    """How rollouts are sampled."""

    max_new_tokens: int = Field(64, gt=0, description="Longest continuation.")
    temperature: float = Field(1.0, ge=0, description="0 = greedy.")
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens (0 = all).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus mass.")
    repetition_penalty: float = Field(1.0, gt=0, description="CTRL-style penalty on seen tokens.")


class PPOSettings(PluginSettings):
    """PPO with critic warm-up and a decaying KL coefficient (the report's settings are the defaults)."""

    reward_model: str | None = Field(None, description="Frozen reward-model checkpoint; also seeds the critic.")
    reference: str | None = Field(None, description="Frozen reference checkpoint; default: align.init_from.")
    kl_start: float = Field(0.2, ge=0, description="KL coefficient at the first step.")
    kl_end: float = Field(0.005, ge=0, description="KL coefficient at the last step.")
    kl_shape: Literal["linear", "cosine", "exponential"] = Field("linear", description="KL schedule.")
    clip: float = Field(0.1, gt=0, description="PPO ratio clip epsilon.")
    value_clip: float = Field(0.2, gt=0, description="Critic value clip.")
    gamma: float = Field(1.0, gt=0, le=1, description="Discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    critic_warmup_steps: int = Field(20, ge=0, description="Steps in which only the critic trains.")
    epochs: int = Field(2, gt=0, description="Optimizer steps on each rollout batch.")
    value_coef: float = Field(0.5, ge=0, description="Weight of the critic loss.")
    sampling: SamplingSettings = Field(default_factory=SamplingSettings, description="Rollout sampling.")


@register("algorithm", "ppo", settings=PPOSettings, legacy={
    "align.ppo": "", "align.sampling": "sampling", "align.reward_model": "reward_model", "align.reference": "reference",
})
class PPO(Algorithm):
    check_config = config_check("ppo", needs=("align.init_from", "ppo.reward_model"))

    def __init__(self, cfg: HainaConfig) -> None:
        super().__init__(cfg)
        p = self.settings
        self.kl = KLSchedule(start=p.kl_start, end=p.kl_end, steps=cfg.train.steps, shape=p.kl_shape)
        self.warmup = CriticWarmup(steps=p.critic_warmup_steps)
        self.tokenizer = load_tokenizer(cfg)
        self.reference: nn.Module | None = None
        self.reward_model: nn.Module | None = None

    def build_model(self, cfg: HainaConfig, device: torch.device) -> nn.Module:
        with device:
            model = ActorCritic(cfg)
        model.init_weights()
        return model

    def setup(self, engine: Engine, resumed: bool) -> None:
        # DCP only when a run starts: listing or validating plugins must not load the checkpoint machinery
        from haina.core.checkpoint import load_model_weights

        init_from, p = self.cfg.align.init_from, self.settings
        model = engine.parts[0]
        if not resumed:
            load_model_weights(init_from, model, prefix="actor.")
            load_model_weights(p.reward_model, model, prefix="critic.")
        self.reference = engine.prepare_frozen(build_model(self.cfg, engine.device), p.reference or init_from)
        self.reward_model = engine.prepare_frozen(build_value_model(self.cfg, engine.device), p.reward_model)

    def batches(self, cfg: HainaConfig, run_dir: Path, num_samples: int) -> PromptBatches:
        return PromptBatches(
            read_prompts(cfg.align.data), self.tokenizer, cfg.train.seq_len, cfg.train.micro_batch_size,
            cfg.train.seed,
        )

    # ------------------------------------------------------------------------------------------ rollout

    @torch.no_grad()
    def rollout(self, engine: Engine, step: int, prompts: list[list[int]]) -> dict[str, Any]:
        """Generate, then score everything PPO needs from the models as they are now."""
        model = engine.parts[0]
        s = self.settings.sampling
        sampling = Sampling(
            max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
            repetition_penalty=s.repetition_penalty, seed=self.cfg.train.seed + 100_003 * step + engine.dp_rank,
        )
        start = time.perf_counter()
        with engine.autocast:
            replies = generate(
                model.actor, prompts, sampling, eos_id=self.tokenizer.eos_id, group=dist.group.WORLD,
                vocab_limit=self.tokenizer.vocab_size,
            )
        rollout_s = time.perf_counter() - start
        replies = [r[: self.cfg.train.seq_len - len(p)] or [self.tokenizer.eos_id] for p, r in zip(prompts, replies, strict=True)]
        rows = [p + r for p, r in zip(prompts, replies, strict=True)]
        width = max(len(r) for r in rows)
        tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=engine.device)
        lengths = [len(r) for r in rows]
        response = response_mask_from_prompts([len(p) for p in prompts], lengths, width).to(engine.device)
        targets = shifted_targets(tokens, response)
        mask = targets != -100  # [b, s]: position t predicts a response token
        last = torch.tensor(lengths, device=engine.device) - 1
        with engine.autocast:
            old_logp = token_logps(model.actor(tokens, logits=slice(None)), targets)
            ref_logp = token_logps(self.reference(tokens, logits=slice(None)), targets)
            values = model.critic(tokens, logits=slice(None))[..., 0].float()
            scores = self.reward_model(tokens, logits=slice(None))[..., 0].float()
        score = scores.gather(1, last[:, None])[:, 0]
        kl_coef = self.kl(step)
        rewards = kl_penalty_rewards(old_logp, ref_logp, score, mask, kl_coef)
        p = self.settings
        advantages, returns = gae(rewards, values * mask, mask, gamma=p.gamma, lam=p.lam)
        return {
            "tokens": tokens, "targets": targets, "mask": mask, "old_logp": old_logp, "ref_logp": ref_logp,
            "values": values * mask, "returns": returns, "advantages": masked_whiten(advantages, mask),
            "score": score, "kl_coef": kl_coef, "rollout_s": rollout_s,
            "new_tokens": sum(len(r) for r in replies), "replies": replies,
        }

    # ----------------------------------------------------------------------------------------- training

    def train_step(self, engine: Engine, step: int, micro_batches: list[dict[str, Any]]) -> dict[str, float]:
        model = engine.parts[0]
        prompts = [ids for batch in micro_batches for ids in batch["ids"]]
        roll = self.rollout(engine, step, prompts)
        mask = roll["mask"]
        actor_trains = self.warmup.actor_trains(step)
        p = self.settings
        start = time.perf_counter()
        for _ in range(p.epochs):
            engine.zero_grad()
            with engine.autocast:
                with torch.set_grad_enabled(actor_trains):
                    logits = model.actor(roll["tokens"], logits=slice(None))
                logp = token_logps(logits, roll["targets"])
                policy_loss, clip_frac, approx_kl = ppo_policy_loss(
                    logp, roll["old_logp"], roll["advantages"], mask, clip=p.clip
                )
                values = model.critic(roll["tokens"], logits=slice(None))[..., 0].float()
                value_loss, value_clip_frac = ppo_value_loss(
                    values, roll["values"], roll["returns"], mask, clip=p.value_clip
                )
                loss = p.value_coef * value_loss + (policy_loss if actor_trains else 0.0)
            engine.backward(loss)
            grad_norm = engine.optimizer_step()
        train_s = time.perf_counter() - start
        with torch.no_grad():
            entropy = masked_mean(entropy_from_logits(logits.detach().float()), mask)
            kl = ((roll["old_logp"] - roll["ref_logp"]) * mask).sum(-1).mean()
        trained_tokens = int(mask.sum()) * p.epochs
        return {
            "loss": float(loss.detach()), "grad_norm": grad_norm, "reward": float(roll["score"].mean()),
            "kl": float(kl), "kl_coef": roll["kl_coef"], "entropy": float(entropy),
            "policy_loss": float(policy_loss.detach()), "clip_fraction": float(clip_frac), "approx_kl": float(approx_kl),
            "value_loss": float(value_loss.detach()), "value_clip_fraction": float(value_clip_frac),
            "response_length": roll["new_tokens"] / len(prompts), "actor_trains": float(actor_trains),
            "rollout_tokens_per_s": roll["new_tokens"] / max(roll["rollout_s"], 1e-9),
            "train_tokens_per_s": trained_tokens / max(train_s, 1e-9),
        }
