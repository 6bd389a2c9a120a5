"""The ``sft`` algorithm: supervised fine-tuning on chat conversations, loss on the assistant replies only.

Several conversations are packed per sequence; segment ids keep attention inside each conversation and
positions restart at each one, so packing changes throughput, not what the model sees. The loss is the
pretraining loss (chunked cross-entropy + max-z) on the packed targets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field

from haina.core.config import PluginSettings
from haina.core.distributed import is_main_process
from haina.core.errors import InputFileError
from haina.core.registry import register
from haina.core.tokenizer import load_tokenizer
from haina.plugins.algorithms.pretrain import Pretrain
from haina.plugins.align.chat_format import ChatBatches, read_conversations
from haina.plugins.align.common import config_check
from haina.plugins.align.quality_gate import format_gate, group_by_batch, spot_check

if TYPE_CHECKING:
    from haina.core.config import HainaConfig
    from haina.core.loss import LossOutput


class SFTSettings(PluginSettings):
    """The batch spot-check gate before training (the report's annotation quality control)."""

    gate_reviews: str | None = Field(None, description="Reviewer verdicts (JSONL id/accept) for the gate; none = no gate.")
    gate_sample: int = Field(5, gt=0, description="Items spot-checked per annotation batch.")
    gate_threshold: float = Field(0.8, ge=0, le=1, description="Lowest acceptance rate a batch may have to be kept.")


@register("algorithm", "sft", settings=SFTSettings, legacy={
    "align.gate_reviews": "gate_reviews", "align.gate_sample": "gate_sample", "align.gate_threshold": "gate_threshold",
})
class SFT(Pretrain):
    """Starts from ``align.init_from`` (a pretraining run) and trains on ``align.data`` conversations."""

    check_config = config_check("sft")

    def batches(self, cfg: HainaConfig, run_dir: Path, num_samples: int) -> Any:
        items = read_conversations(cfg.align.data)
        if self.settings.gate_reviews is not None:
            items = self.gate(items, cfg, self.settings, run_dir)
        return ChatBatches(items, load_tokenizer(cfg), cfg.train.seq_len, cfg.train.micro_batch_size, cfg.train.seed)

    @staticmethod
    def gate(items: list[dict[str, Any]], cfg: HainaConfig, a: SFTSettings, run_dir: Path) -> list[dict[str, Any]]:
        """The batch spot-check before training; its report goes to ``run_dir/gate_report.json``."""
        report = spot_check(group_by_batch(items), a.gate_sample, a.gate_threshold, a.gate_reviews, cfg.train.seed)
        if is_main_process():
            (run_dir / "gate_report.json").write_text(json.dumps(report.to_json(), indent=2))
            print(format_gate(report), flush=True)
        if not report.kept:
            rejected = [b.batch for b in report.batches if not b.kept]
            raise InputFileError(
                f"sft.gate_reviews: the gate rejected every batch ({', '.join(map(str, rejected))}); nothing to "
                f"train on (see {run_dir / 'gate_report.json'})"
            )
        return report.kept

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        device = next(model.parameters()).device
        tokens, labels, segments, positions = (
            batch[k].to(device) for k in ("tokens", "labels", "segments", "positions")
        )
        hidden = model(tokens, positions, segments=segments)
        return self.loss_from_hidden(model, hidden, labels)
