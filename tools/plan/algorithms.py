"""What each algorithm puts on a rank: the models it trains and keeps frozen, the rows of one forward,
the loss it runs, and whether it decodes (rollouts with a KV cache).

Read off the algorithm plugins: pretrain and sft train one language model on ``micro_batch_size`` rows
(sft packs documents: a masked attention); rm trains a value-head model on pairs (2 rows each); dpo
trains the policy on pairs and keeps a frozen reference, with full logits; ppo trains actor and critic
together (one module) on the whole step's prompts at once and keeps the reference and the reward model
frozen (four models); grpo, rloo and reinforce_pp train the actor on ``n_samples`` responses per prompt,
with a frozen reference only when ``beta > 0`` and a reward model only when a reward term is one. An RL
step decodes all its micro-batches' prompts (``rollout_micro_batch`` rows at a time where the release has
that setting) and trains them in ``mini_batches`` forwards (one where it has not).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from haina.core.config import ConfigError, HainaConfig, ModelConfig, plugin_settings
from haina.core.parallel.mesh import Layout

ALIGNMENT = ("sft", "rm", "dpo", "ppo", "grpo", "rloo", "reinforce_pp")
ALGORITHMS = ("pretrain", *ALIGNMENT)
CRITIC_FREE = ("grpo", "rloo", "reinforce_pp")


@dataclass(frozen=True)
class Role:
    """One model of an algorithm: its name, its shape, and whether it trains."""

    name: str
    model: ModelConfig
    trained: bool


@dataclass(frozen=True)
class Workload:
    """An algorithm's models and what one of its forwards looks like."""

    algorithm: str
    roles: tuple[Role, ...]
    rows: int  # rows of one trained forward on one data-parallel rank
    seq: int  # tokens per row
    loss: str  # "chunked_lm", "full_logits", "value", "logps"
    segments: bool = False
    rows_per_sample: int = 1  # preference pairs: chosen and rejected rows
    rollout_rows: int = 0  # rows decoded and scored at once (RL), 0 = no rollout
    step_rows: int = 0  # RL: all of a step's rows on one data-parallel rank
    kv_len: int = 0
    epochs: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def trained(self) -> tuple[Role, ...]:
        return tuple(r for r in self.roles if r.trained)

    @property
    def frozen(self) -> tuple[Role, ...]:
        return tuple(r for r in self.roles if not r.trained)


def value_model(model: ModelConfig) -> ModelConfig:
    """The model with the scalar value head in the LM head's place (reward model, critic)."""
    return model.model_copy(update={"head": "value"})


def _reward_models(spec: Any) -> int:
    """How many reward terms of a reward spec are reward models (``type: model``)."""
    terms = spec if isinstance(spec, list) else [spec]
    count = 0
    for term in terms:
        kind = term if isinstance(term, str) else (term.get("type") if isinstance(term, dict) else None)
        count += kind == "model"
    return count


def workload(cfg: HainaConfig, layout: Layout, algorithm: str | None = None) -> Workload:
    """The workload of ``algorithm`` (default: the config's) under ``cfg`` on ``layout``."""
    name = algorithm or cfg.algorithm
    m, t = cfg.model, cfg.train
    lm, value = m, value_model(m)
    if name in ("pretrain", "sft"):
        return Workload(name, (Role("model", lm, True),), t.micro_batch_size, t.seq_len, "chunked_lm",
                        segments=name == "sft")
    if name == "rm":
        return Workload(name, (Role("reward model", value, True),), 2 * t.micro_batch_size, t.seq_len, "value",
                        rows_per_sample=2)
    if name == "dpo":
        return Workload(name, (Role("policy", lm, True), Role("reference", lm, False)), 2 * t.micro_batch_size,
                        t.seq_len, "full_logits", rows_per_sample=2)
    if name == "ppo" or name in CRITIC_FREE:
        own = plugin_settings(cfg, "algorithm", name)
        prompts = t.micro_batch_size * layout.grad_accum  # a step takes all its micro-batches' prompts
        samples = getattr(own, "n_samples", 1)
        rows = prompts * samples
        # an update forward takes a mini-batch of the rows; decoding and scoring ``rollout_micro_batch`` rows at
        # a time (settings of newer releases; without them, all rows at once)
        mini = max(1, min(getattr(own, "mini_batches", 1), rows))
        update_rows = -(-rows // mini)
        at_once = getattr(own, "rollout_micro_batch", 0) or rows
        # prompts are cut to seq_len // 2 (PromptBatches) and replies to what fits seq_len
        seq = min(t.seq_len, t.seq_len // 2 + own.sampling.max_new_tokens)
        notes = [f"{name}: {rows} rollout rows per rank of up to {seq} tokens (prompt <= seq_len/2 + max_new_tokens "
                 f"{own.sampling.max_new_tokens}), decoded {min(at_once, rows)} at a time, trained {update_rows} per forward"]
        if getattr(own, "generator", ""):
            notes.append(f"{name}.generator {own.generator}: an external generator's own memory is not planned")
        roles = [Role("actor", lm, True)]
        if name == "ppo":
            roles.append(Role("critic", value, True))
            roles.append(Role("reference", lm, False))
            rewards = _reward_models(own.reward) if own.reward else 1
        else:
            if own.beta > 0:
                roles.append(Role("reference", lm, False))
            rewards = _reward_models(own.reward)
            if not own.reward:
                notes.append(f"{name}.reward is empty (the run refuses it); planned without a reward model")
        roles += [Role("reward model" if rewards == 1 else f"reward model {i + 1}", value, False) for i in range(rewards)]
        return Workload(name, tuple(roles), update_rows, seq, "logps", rollout_rows=min(at_once, rows), step_rows=rows,
                        kv_len=seq, epochs=own.epochs, notes=notes)
    raise ConfigError(f"the planner does not know algorithm {name!r}; it knows {', '.join(ALGORITHMS)}")
