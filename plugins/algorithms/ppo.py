"""The ``ppo`` algorithm: RLHF with four models, as in the Baichuan 2 report.

Trained: the actor (from ``align.init_from``, an SFT run) and the critic (from ``ppo.reward_model``, else
the actor's start with a fresh value head), held together in :class:`ActorCritic`. Frozen: the reference
(``ppo.reference``, default the actor's start) and the rewards (``ppo.reward``, default the reward model
``ppo.reward_model``; any reward plugin or a weighted sum, e.g. helpfulness + harmlessness). Each engine
step generates one rollout batch, scores it, turns the score and a per-token KL penalty against the
reference into rewards, estimates advantages with GAE, and takes ``ppo.epochs`` clipped updates on it.
During the first ``critic_warmup_steps`` only the critic learns; the actor gets no gradient, so its
weights (and Adam state) stay exactly as loaded. Token log-probabilities and the entropy come from the
chunked path (:mod:`haina.plugins.align.token_logprobs`), never from full logits.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field
from torch import nn

from haina.core.algorithm import Algorithm
from haina.core.config import ConfigError, plugin_settings
from haina.core.loss import LossOutput
from haina.core.materialize import build
from haina.core.model import META, Transformer, build_model
from haina.core.registry import register
from haina.core.tokenizer import load_tokenizer
from haina.plugins.algorithms.reward_model import value_config
from haina.plugins.align.advantages import global_masked_whiten
from haina.plugins.align.common import check_layout
from haina.plugins.align.packing import ModelInputs, model_inputs
from haina.plugins.align.preference_data import PromptBatches, read_prompts
from haina.plugins.align.rl import (
    CriticWarmup,
    KLSchedule,
    gae,
    kl_penalty_rewards,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    tokens_per_rank,
)
from haina.plugins.align.rollout import (
    RLSettings,
    check_rl_settings,
    make_generator,
    mini_batch_rows,
    per_position,
    sample_rollout,
)
from haina.plugins.align.token_logprobs import model_token_logps, trained_token_logps
from haina.plugins.rewards.base import RewardSpec, parse_reward_spec, sync_over_tp
from haina.plugins.rewards.combine import build_reward

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


class PPOSettings(RLSettings):
    """PPO with critic warm-up and a decaying KL coefficient (the report's settings are the defaults)."""

    reward_model: str | None = Field(
        None, description="Reward-model checkpoint: the reward unless ppo.reward says otherwise, and the critic's start."
    )
    reward: RewardSpec = Field(
        default_factory=list, description="Reward terms: a reward plugin, or a list of {type, name, weight, "
        "<settings>} summed (see haina.plugins.rewards.base); empty: the reward model.",
    )
    kl_start: float = Field(0.2, ge=0, description="KL coefficient at the first step.")
    kl_end: float = Field(0.005, ge=0, description="KL coefficient at the last step.")
    kl_shape: Literal["linear", "cosine", "exponential"] = Field("linear", description="KL schedule.")
    clip: float = Field(0.1, gt=0, description="PPO ratio clip epsilon.")
    value_clip: float = Field(0.2, gt=0, description="Critic value clip.")
    gamma: float = Field(1.0, gt=0, le=1, description="Discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    critic_warmup_steps: int = Field(20, ge=0, description="Steps in which only the critic trains.")
    epochs: int = Field(2, gt=0, description="Passes over each rollout batch.")
    value_coef: float = Field(0.5, ge=0, description="Weight of the critic loss.")


@register("algorithm", "ppo", settings=PPOSettings, legacy={
    "align.ppo": "", "align.sampling": "sampling", "align.reward_model": "reward_model", "align.reference": "reference",
})
class PPO(Algorithm):
    @classmethod
    def check_config(cls, cfg: HainaConfig) -> None:
        check_layout(cfg, "ppo")
        if cfg.align.init_from is None:
            raise ConfigError("align.init_from: the ppo algorithm needs it")
        own = plugin_settings(cfg, "algorithm", "ppo")
        if not own.reward and own.reward_model is None:
            raise ConfigError("ppo.reward_model: the ppo algorithm needs it (or rewards of other kinds in ppo.reward)")
        build_reward(reward_terms(own), cfg, "ppo.reward")
        check_rl_settings(cfg, own, "ppo")

    def __init__(self, cfg: HainaConfig) -> None:
        super().__init__(cfg)
        p = self.settings
        self.kl = KLSchedule(start=p.kl_start, end=p.kl_end, steps=cfg.train.steps, shape=p.kl_shape)
        self.warmup = CriticWarmup(steps=p.critic_warmup_steps)
        self.tokenizer = load_tokenizer(cfg)
        self.reference: nn.Module | None = None
        self.reward = build_reward(reward_terms(p), cfg, "ppo.reward")
        self.generator = make_generator(p.generator, cfg, self.tokenizer, "ppo.generator")
        vocab = self.tokenizer.vocab_size
        self.vocab_limit = vocab if vocab < cfg.model.vocab_size else None

    def build_model(self, cfg: HainaConfig, device: torch.device) -> nn.Module:
        return build(lambda: ActorCritic(cfg), device, cfg.train.seed)

    def setup(self, engine: Engine, resumed: bool) -> None:
        # DCP and FSDP only when a run starts: listing or validating plugins must not load that machinery
        from torch.distributed.fsdp import FSDPModule

        from haina.core.checkpoint import load_model_weights

        init_from, p = self.cfg.align.init_from, self.settings
        model = engine.parts[0]
        if not resumed:
            load_model_weights(init_from, model, prefix="actor.")
            load_model_weights(p.reward_model or init_from, model, prefix="critic.")
        if isinstance(model.actor, FSDPModule):
            # the chunked log-probs read the actor's head weight after its forward: keep it gathered until
            # the backward, as the root unit of a single model does
            model.actor.set_reshard_after_forward(False, recurse=False)
        self.reference = engine.prepare_frozen(build_model(self.cfg, META), p.reference or init_from)
        self.reward.setup(engine)

    def batches(self, cfg: HainaConfig, run_dir: Path, num_samples: int) -> PromptBatches:
        return PromptBatches(
            read_prompts(cfg.align.data), self.tokenizer, cfg.train.seq_len, cfg.train.micro_batch_size,
            cfg.train.seed,
        )

    # ------------------------------------------------------------------------------------------ rollout

    def _logp_options(self) -> dict[str, Any]:
        return {"temperature": self.settings.sampling.logp_temperature, "vocab_limit": self.vocab_limit}

    @torch.no_grad()
    def rollout(
        self, engine: Engine, step: int, prompts: list[list[int]], items: list[dict[str, Any]] | None = None,
        positions: list[int] | None = None,
    ) -> dict[str, Any]:
        """Generate, then score everything PPO needs from the models as they are now."""
        model = engine.parts[0]
        p = self.settings
        roll = sample_rollout(
            engine, self.generator, model.actor, prompts, items or [{} for _ in prompts], p.sampling,
            tokenizer=self.tokenizer, seq_len=self.cfg.train.seq_len, seed=self.cfg.train.seed + 100_003 * step,
            positions=positions if positions is not None else list(range(len(prompts))),
            micro_batch=p.rollout_micro_batch,
        )
        tokens, targets, mask, lengths = roll.tokens, roll.targets, roll.mask, roll.lengths
        chunk, rows = self.cfg.loss.chunk_size, (p.rollout_micro_batch, p.pack)
        with engine.autocast:
            old_logp = per_position(lambda x: trained_token_logps(
                engine, x.tokens, x.targets, chunk, submodule="actor", positions=x.positions, segments=x.segments,
                **self._logp_options(),
            ).logp, tokens, targets, lengths, *rows)
            ref_logp = per_position(lambda x: model_token_logps(
                self.reference, x.tokens, x.targets, chunk, positions=x.positions, segments=x.segments,
                **self._logp_options(),
            ).logp, tokens, targets, lengths, *rows)
            values = per_position(lambda x: _values(model.critic, x), tokens, targets, lengths, *rows)
            total, parts = self.reward.score_terms(roll.reward_input(self.tokenizer))
        scores = sync_over_tp(torch.stack([total, *parts.values()]), engine)
        score = scores[0]
        kl_coef = self.kl(step)
        rewards = kl_penalty_rewards(old_logp, ref_logp, score, mask, kl_coef)
        advantages, returns = gae(rewards, values * mask, mask, gamma=p.gamma, lam=p.lam)
        return {
            "tokens": tokens, "targets": targets, "mask": mask, "lengths": lengths, "old_logp": old_logp,
            "ref_logp": ref_logp, "values": values * mask, "returns": returns,
            "advantages": global_masked_whiten(advantages, mask), "score": score,
            "parts": {f"reward/{n}": float(v.mean()) for n, v in zip(parts, scores[1:], strict=True)},
            "kl_coef": kl_coef, "rollout_s": roll.rollout_s, "new_tokens": roll.new_tokens, "replies": roll.replies,
            "gen_logp": roll.gen_logp,
        }

    # ----------------------------------------------------------------------------------------- training

    def update_loss(self, model: nn.Module, roll: dict[str, Any], actor_trains: bool) -> LossOutput:
        """The critic's loss and, once the warm-up is over, the actor's, on rollout rows (a mini-batch)."""
        p, mask = self.settings, roll["mask"]
        inputs = model_inputs(roll["tokens"], roll["targets"], roll["lengths"], p.pack)
        with torch.set_grad_enabled(actor_trains and torch.is_grad_enabled()):
            new = model_token_logps(
                model.actor, inputs.tokens, inputs.targets, self.cfg.loss.chunk_size, entropy=True,
                positions=inputs.positions, segments=inputs.segments, **self._logp_options(),
            )
        logp = inputs.unpack(new.logp)
        policy_loss, clip_frac, approx_kl = ppo_policy_loss(
            logp, roll["old_logp"], roll["advantages"], mask, clip=p.clip, tokens=roll["tokens_per_rank"],
        )
        values = inputs.unpack(_values(model.critic, inputs))
        value_loss, value_clip_frac = ppo_value_loss(
            values, roll["values"], roll["returns"], mask, clip=p.value_clip, tokens=roll["tokens_per_rank"],
        )
        loss = p.value_coef * value_loss + (policy_loss if actor_trains else 0.0)
        entropy = inputs.unpack(new.entropy) if new.entropy is not None else torch.zeros_like(logp)
        return LossOutput(loss, {
            "policy_loss": policy_loss.detach(), "clip_fraction": clip_frac, "approx_kl": approx_kl,
            "value_loss": value_loss.detach(), "value_clip_fraction": value_clip_frac,
            "entropy": masked_mean(entropy.detach(), mask),
        })

    def train_step(self, engine: Engine, step: int, micro_batches: list[dict[str, Any]]) -> dict[str, float]:
        prompts = [ids for batch in micro_batches for ids in batch["ids"]]
        items = [it for batch in micro_batches for it in batch["items"]]
        positions = [pos for batch in micro_batches for pos in batch["positions"]]
        roll = self.rollout(engine, step, prompts, items, positions)
        mask = roll["mask"]
        actor_trains = self.warmup.actor_trains(step)
        p = self.settings
        start = time.perf_counter()
        row_keys = ("tokens", "targets", "mask", "lengths", "old_logp", "ref_logp", "values", "returns", "advantages")
        for epoch in range(p.epochs):
            for rows in mini_batch_rows(mask.shape[0], p.mini_batches, self.cfg.train.seed + 7919 * step + epoch):
                part = {k: roll[k][rows.to(mask.device)] for k in row_keys}
                part["tokens_per_rank"] = tokens_per_rank(part["mask"])
                engine.zero_grad()
                with engine.autocast:
                    out = engine.forward_loss(self.update_loss, part, actor_trains)
                engine.backward(out.loss)
                grad_norm = engine.optimizer_step()
        train_s = time.perf_counter() - start
        with torch.no_grad():
            kl = ((roll["old_logp"] - roll["ref_logp"]) * mask).sum(-1).mean()
            gen_gap = ((roll["gen_logp"] - roll["old_logp"]).abs() * mask).sum() / mask.sum().clamp(min=1)
        trained_tokens = int(mask.sum()) * p.epochs
        return {
            "loss": float(out.loss.detach()), "grad_norm": grad_norm, "reward": float(roll["score"].mean()),
            **roll["parts"], "kl": float(kl), "kl_coef": roll["kl_coef"],
            **{k: float(v) for k, v in out.parts.items()},
            "response_length": roll["new_tokens"] / len(roll["replies"]), "actor_trains": float(actor_trains),
            "generator_logp_gap": float(gen_gap),
            "rollout_tokens_per_s": roll["new_tokens"] / max(roll["rollout_s"], 1e-9),
            "train_tokens_per_s": trained_tokens / max(train_s, 1e-9),
        }


def _values(critic: nn.Module, inputs: ModelInputs) -> torch.Tensor:
    """The critic's value at every position [rows, W] (fp32)."""
    return critic(inputs.tokens, inputs.positions, segments=inputs.segments, logits=slice(None))[..., 0].float()


def reward_terms(settings: PPOSettings) -> list[dict[str, Any]]:
    """PPO's reward terms: ``ppo.reward``, or the reward model ``ppo.reward_model`` alone."""
    return settings.reward or parse_reward_spec("model")
