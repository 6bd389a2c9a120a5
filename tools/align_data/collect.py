"""``haina rm collect``: responses to a prompt set from several models and sampling settings.

The report's reward model learns from responses of its own model family at different sizes and training
stages. A collection config lists the models (run or step directories, PPO actors through ``prefix``,
Hugging Face exports) and the sampling settings; every (prompt, model, setting, sample) gets one JSONL
record that says which model (path and training step) and which setting produced it.

Resumable: records already in ``out`` (or in the per-rank part files of an interrupted run) are skipped,
so a killed collection continues where it stopped. Under torchrun prompts are dealt to the data-parallel
ranks, each writing its own part file; tensor parallelism shards each model (``parallel.tp=N``). At the
end rank 0 merges the parts into ``out`` in a fixed order.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from haina.core import collectives
from haina.core.checkpoint import TRAINER_STATE, resolve_checkpoint
from haina.core.distributed import default_device, init_distributed, is_main_process
from haina.core.errors import ConfigError, InputFileError
from haina.core.files import read_jsonl, read_yaml, write_durable
from haina.core.generate import Sampling, generate
from haina.core.model_loading import is_hf_dir, open_model
from haina.core.overrides import apply_override
from haina.core.placement import inference_config, place
from haina.core.tokenizer import load_tokenizer
from haina.plugins.align.chat_format import render_prompt
from haina.plugins.align.preference_data import read_prompts


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSource(_Strict):
    name: str = Field(description="how records name this model")
    checkpoint: str = Field(description="run or step directory, or a Hugging Face export")
    prefix: str = Field("", description="sub-model of the checkpoint (actor. of a PPO run)")


class SamplingSetting(_Strict):
    name: str
    samples: int = Field(1, ge=1, description="responses per prompt with this setting")
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    seed: int = 0


class CollectConfig(_Strict):
    prompts: str = Field(description="JSONL of prompts: id, prompt (text or chat messages), any other fields")
    out: str = Field(description="JSONL of responses")
    models: list[ModelSource] = Field(min_length=1)
    settings: list[SamplingSetting] = Field(min_length=1)
    tokenizer: str | None = Field(None, description="default: the model's own")
    batch_size: int = Field(16, ge=1)


def load_collect_config(path: str | Path, overrides: list[str] | None = None) -> CollectConfig:
    data = read_yaml(path, what="collection config", error=ConfigError)
    for override in overrides or []:
        apply_override(data, override)
    try:
        cfg = CollectConfig(**data)
    except ValidationError as error:
        first = error.errors()[0]
        raise ConfigError(f"{path}: {'.'.join(str(x) for x in first['loc'])}: {first['msg']}") from None
    names = [m.name for m in cfg.models]
    if len(set(names)) != len(names) or len({s.name for s in cfg.settings}) != len(cfg.settings):
        raise ConfigError(f"{path}: model names and setting names must be unique")
    return cfg


def record_id(prompt_id: str, model: str, setting: str, sample: int) -> str:
    return f"{prompt_id}|{model}|{setting}|{sample}"


def _torn_line(path: Path) -> int | None:
    """The number of the last line when it is torn (the file does not end a line: killed mid-write)."""
    data = path.read_bytes()
    return data.count(b"\n") + 1 if data and not data.endswith(b"\n") else None


def _read_done(paths: list[Path]) -> dict[str, dict[str, Any]]:
    """Records already collected, by id; a torn last line (killed mid-write) is ignored, any other bad
    line fails naming it."""
    done: dict[str, dict[str, Any]] = {}
    for path in paths:
        if not path.is_file():
            continue
        torn = _torn_line(path)
        try:
            for _, record in read_jsonl(path):
                if "id" in record:
                    done[record["id"]] = record
        except InputFileError as error:
            if torn is None or not str(error).startswith(f"{path}:{torn}:"):
                raise
    return done


def _drop_torn_line(path: Path) -> None:
    """Cut a torn last line off ``path``, so the records appended next start on a line of their own."""
    if path.is_file() and _torn_line(path) is not None:
        data = path.read_bytes()
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def _step_of(checkpoint: str) -> int | None:
    if is_hf_dir(checkpoint):
        return None  # a Hugging Face export
    return int(json.loads((resolve_checkpoint(checkpoint) / TRAINER_STATE).read_text())["step"])


def _prompt_fields(item: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k != "id"}


def collect(cfg: CollectConfig, overrides: list[str] | None = None, progress: bool = True) -> dict[str, Any]:
    """Generate every missing record; returns counts. Runs as one process or under torchrun."""
    import torch.distributed as dist

    items = read_prompts(cfg.prompts)
    for number, item in enumerate(items):
        item.setdefault("id", str(number))
    out = Path(cfg.out)
    init_distributed(default_device())
    world, rank = dist.get_world_size(), dist.get_rank()
    parts = _parts_dir(out)
    done = _read_done([out, *sorted(parts.glob("*.jsonl"))])
    collectives.barrier()  # every rank has read the same records before any writes more
    parts.mkdir(parents=True, exist_ok=True)
    part_file = parts / f"rank-{rank:05d}.jsonl"
    _drop_torn_line(part_file)  # a record torn by a kill; it is generated again
    made = 0
    for source in cfg.models:
        opened = open_model(source.checkpoint, prefix=source.prefix)
        model_cfg = opened.cfg
        tokenizer = load_tokenizer(model_cfg, cfg.tokenizer)
        run_cfg = inference_config(model_cfg, [*(overrides or []), "parallel.sequence_parallel=false"], cfg.batch_size,
                                   "rm collect")
        placed = place(opened, run_cfg, world)
        step = _step_of(source.checkpoint)
        for setting in cfg.settings:
            sampling = Sampling(**setting.model_dump(exclude={"name", "samples"}))
            todo = [(item, k) for item in items for k in range(setting.samples)
                    if record_id(item["id"], source.name, setting.name, k) not in done]
            # Every rank of a data-parallel group runs the same number of batches (FSDP gathers pair up).
            mine = todo[placed.dp_rank :: placed.layout.dp]
            rounds = -(-len(todo) // (placed.layout.dp * cfg.batch_size))
            for r in range(rounds):
                batch = mine[r * cfg.batch_size : (r + 1) * cfg.batch_size]
                ids = [render_prompt(item["prompt"], tokenizer) for item, _ in batch] or [[tokenizer.bos_id]]
                seeded = replace(sampling, seed=sampling.seed + r * placed.layout.dp + placed.dp_rank)
                with placed.autocast:
                    replies = generate(placed.model, ids, seeded, eos_id=tokenizer.eos_id,
                                       group=dist.group.WORLD if world > 1 else None, vocab_limit=tokenizer.vocab_size)
                if placed.tp_rank != 0 or not batch:
                    continue
                with part_file.open("a", encoding="utf-8") as f:
                    for (item, k), reply in zip(batch, replies, strict=True):
                        text = tokenizer.decode([t for t in reply if t != tokenizer.eos_id])
                        record = {
                            **_prompt_fields(item), "id": record_id(item["id"], source.name, setting.name, k),
                            "prompt_id": item["id"], "response": text, "model": source.name,
                            "checkpoint": str(source.checkpoint), "prefix": source.prefix, "step": step,
                            "setting": setting.name, "sampling": setting.model_dump(exclude={"name", "samples"}),
                            "sample": k, "finished": bool(reply) and reply[-1] == tokenizer.eos_id,
                        }
                        f.write(json.dumps(record, ensure_ascii=False) + "\n")
                        made += 1
                if progress and is_main_process():
                    print(f"collect {source.name}/{setting.name}: batch {r + 1}/{rounds}", flush=True)
        del placed
    collectives.barrier()
    total = 0
    if is_main_process():
        total = _merge(out, items, cfg)
    collectives.barrier()
    return {"new": made, "records": total, "out": str(out)}


def _merge(out: Path, items: list[dict[str, Any]], cfg: CollectConfig) -> int:
    """Write ``out`` from itself and the part files in prompt / model / setting / sample order, then drop
    the parts (``out`` is replaced atomically: it appears whole)."""
    parts = _parts_dir(out)
    done = _read_done([out, *sorted(parts.glob("*.jsonl"))])
    order = [record_id(item["id"], m.name, s.name, k) for m in cfg.models for s in cfg.settings
             for item in items for k in range(s.samples)]
    write_durable(out, "".join(json.dumps(done[key], ensure_ascii=False) + "\n" for key in order if key in done))
    for part in parts.glob("*.jsonl"):
        part.unlink()
    parts.rmdir()
    return sum(key in done for key in order)
