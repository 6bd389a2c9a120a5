"""The ``rm`` algorithm: a reward model trained on preference pairs with the pairwise ranking loss.

The model is the language model with a scalar value head in the LM head's place (head plugin ``value``),
started from an SFT or pretraining checkpoint; the score of a response is the value at its last token.
After training, held-out pairs (``align.eval_data``) are scored: accuracy overall, by the pair's score gap
(the report's 1..5 buckets) and by prompt category, next to the category coverage of the training prompts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field
from torch import nn

from haina.core.algorithm import Algorithm
from haina.core.config import PluginSettings
from haina.core.distributed import is_main_process
from haina.core.loss import LossOutput
from haina.core.materialize import build
from haina.core.model import Transformer
from haina.core.registry import register
from haina.core.tokenizer import load_tokenizer
from haina.plugins.align.common import config_check
from haina.plugins.align.preference_data import PairBatches, category_key, read_pairs
from haina.plugins.align.preference_losses import accuracy_by_bucket, pairwise_loss
from haina.plugins.align.taxonomy import coverage_report, load_taxonomy

if TYPE_CHECKING:
    from haina.core.config import HainaConfig
    from haina.core.engine import Engine


def value_config(cfg: HainaConfig) -> Any:
    """The model section with the value head in place of the LM head."""
    return cfg.model.model_copy(update={"head": "value"})


def build_value_model(cfg: HainaConfig, device: torch.device) -> nn.Module:
    """The value-head Transformer of ``cfg`` on the meta device, or materialised and initialised on ``device``."""
    return build(lambda: Transformer(value_config(cfg)), device, cfg.train.seed)


def last_token_scores(model: nn.Module, tokens: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The value head's output at each row's last real token: [b]."""
    values = model(tokens, logits=slice(None))[..., 0]
    return values.gather(1, last[:, None].to(values.device))[:, 0].float()


class RMSettings(PluginSettings):
    """Reward-model training."""

    margin: bool = Field(False, description="Subtract the pair's score gap as a margin in the ranking loss.")
    taxonomy: str | None = Field(None, description="YAML prompt taxonomy (three levels) for coverage; default: built-in.")


@register("algorithm", "rm", settings=RMSettings, legacy={"align.margin": "margin", "align.taxonomy": "taxonomy"})
class RewardModelTraining(Algorithm):
    """Pairwise loss -log sigmoid(r_chosen - r_rejected [- gap, with rm.margin])."""

    check_config = config_check("rm")
    metrics = ("accuracy", "reward_margin")

    def build_model(self, cfg: HainaConfig, device: torch.device) -> nn.Module:
        return build_value_model(cfg, device)

    def batches(self, cfg: HainaConfig, run_dir: Path, num_samples: int) -> PairBatches:
        return PairBatches(
            read_pairs(cfg.align.data), load_tokenizer(cfg), cfg.train.seq_len, cfg.train.micro_batch_size,
            cfg.train.seed,
        )

    def scores(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(model.parameters()).device
        r = last_token_scores(model, batch["tokens"].to(device), batch["last"])
        m = r.shape[0] // 2
        return r[:m], r[m:]

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        chosen, rejected = self.scores(model, batch)
        margin = batch["gap"].to(chosen.device) if self.settings.margin else None
        loss = pairwise_loss(chosen, rejected, margin)
        diff = (chosen - rejected).detach()
        return LossOutput(loss, {"accuracy": (diff > 0).float().mean(), "reward_margin": diff.mean()})

    def finish(self, engine: Engine, run_dir: Path) -> None:
        if self.cfg.align.eval_data is None:
            return
        report = evaluate_pairs(engine.parts[0], self.cfg, read_pairs(self.cfg.align.eval_data))
        train_items = read_pairs(self.cfg.align.data)
        report["coverage"] = coverage_report(train_items, load_taxonomy(self.settings.taxonomy))
        if is_main_process():
            (run_dir / "rm_eval.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))


@torch.no_grad()
def evaluate_pairs(model: nn.Module, cfg: HainaConfig, pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """Held-out accuracy overall, by score gap and by top- and second-level category."""
    batches = PairBatches(pairs, load_tokenizer(cfg), cfg.train.seq_len, 1, cfg.train.seed)
    chosen, rejected, items = [], [], []
    algorithm = RewardModelTraining.__new__(RewardModelTraining)
    was_training = model.training
    model.eval()
    for i in range(len(pairs)):
        batch = batches.batch(i)
        c, r = algorithm.scores(model, batch)
        chosen.append(c.cpu())
        rejected.append(r.cpu())
        items.extend(batch["items"])
    model.train(was_training)
    c, r = torch.cat(chosen), torch.cat(rejected)
    report: dict[str, Any] = {"pairs": len(items), "accuracy": float((c > r).float().mean())}
    gaps = [str(it["gap"]) if "gap" in it else "none" for it in items]
    report["by_gap"] = _as_json(accuracy_by_bucket(c, r, gaps))
    for level in (1, 2):
        report[f"by_category_level{level}"] = _as_json(accuracy_by_bucket(c, r, [category_key(it, level) for it in items]))
    return report


def _as_json(buckets: dict[Any, tuple[float, int]]) -> dict[str, dict[str, float]]:
    return {str(k): {"accuracy": acc, "pairs": n} for k, (acc, n) in sorted(buckets.items())}
