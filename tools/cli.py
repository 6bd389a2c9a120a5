"""The ``haina`` command: one entry point, a subcommand per job.

Exit status: 0 on success; 2 on bad input (a :class:`~haina.core.errors.HainaError`, a config that does
not validate, or bad arguments), with one line on stderr saying what and where; 1 when the work itself
fails, with one line on stderr and the traceback in a log file (the run directory's ``logs/`` when the
command has one).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from haina.core.errors import ConfigError, HainaError, one_line

if TYPE_CHECKING:  # the config (pydantic, torch) is imported by the commands that need it: --help stays fast
    from haina.core.config import HainaConfig

# What exits with status 2: bad input, and only that (a ValueError from deep inside is a failure).
BAD_INPUT: tuple[type[BaseException], ...] = (HainaError,)


# Each command imports what it needs inside its own body: `haina --help` loads almost nothing (no torch, no Spark).
def _config(args: argparse.Namespace) -> HainaConfig:
    from haina.core.config import load_config

    cfg = load_config(args.config, args.overrides)
    args.run_dir = cfg.train.run_dir
    return cfg


def _add_config_args(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument("--config", default=default, help="YAML file or preset name (haina plugins --presets)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. model.position=alibi")


# ------------------------------------------------------------------------------------------- commands

def cmd_plugins(args: argparse.Namespace) -> int:
    from haina.core import registry
    from haina.core.config import preset_names

    if args.presets:
        print("\n".join(preset_names()))
        return 0
    entries = registry.entries()
    width = max(len(e.name) for e in entries)
    current = None
    for e in entries:
        if e.kind != current:
            print(f"{e.kind}:")
            current = e.kind
        print(f"  {e.name:<{width}}  ({e.package})" + (f"  settings: {e.section}" if e.settings else ""))
        if e.settings is not None and not args.brief:
            for line in _settings_lines(e.settings, "      "):
                print(line)
    if not args.brief:
        from haina.tools.backend_report import print_backend_report

        print_backend_report()
    return 0


def _settings_lines(settings: type, indent: str) -> list[str]:
    """One line per setting: name, type, default, description (nested settings indented below)."""
    from pydantic import BaseModel

    lines = []
    for name, field in settings.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.append(f"{indent}{name}:  {field.description or ''}")
            lines += _settings_lines(annotation, indent + "  ")
            continue
        kind = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
        default = field.get_default(call_default_factory=True)
        lines.append(f"{indent}{name} ({kind}, default {default!r}): {field.description or ''}")
    return lines


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from haina.tools.tokenizer import train_tokenizer

    cfg = _config(args)
    model = train_tokenizer([Path(p) for p in args.input], Path(args.out), cfg.tokenizer)
    print(f"tokenizer written to {model}")
    return 0


def cmd_tokenizer_report(args: argparse.Namespace) -> int:
    from haina.tools.tokenizer import compression_report, format_report

    print(format_report(compression_report(Path(args.model), Path(args.heldout))))
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    import json

    from haina.data_spark.prepare import prepare_main

    overrides = list(args.overrides)
    if args.max_quarantine_share is not None:
        overrides.append(f"input.max_quarantine_share={args.max_quarantine_share}")
    report = prepare_main(
        [Path(p) for p in args.input], Path(args.output), Path(args.config) if args.config else None,
        args.master, overrides,
    )
    kept = report["kept"]
    print(f"kept {kept['documents']:,} documents ({kept['share_of_raw_tokens']:.1%} of raw tokens); "
          f"report {Path(report['output']) / 'report.json'}")
    if args.print_report:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


def cmd_data_tokenize(args: argparse.Namespace) -> int:
    if args.prepared:
        from haina.data_spark.prepare import tokenize_main

        summary = tokenize_main(Path(args.prepared), Path(args.tokenizer), master=args.master)
        print(f"{summary['tokens']:,} tokens in {summary['parts']} parts; blend {summary['blend']}")
        return 0
    if not args.input or not args.output:
        raise ConfigError("data tokenize: give --prepared DIR, or --input FILE... and --output PREFIX")
    from haina.data_spark.tokenize import tokenize_to_indexed

    stats = tokenize_to_indexed(
        [Path(p) for p in args.input], Path(args.output), Path(args.tokenizer), text_key=args.text_key
    )
    print(" ".join(f"{k}={v}" for k, v in stats.items()))
    return 0


def _launch_torchrun(cfg: HainaConfig, args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``--nproc-per-node N`` on one machine: check the layout here, then let torchrun start N workers."""
    from haina.core.algorithm import check_algorithm
    from haina.core.data import check_data_files
    from haina.core.parallel.mesh import resolve_layout

    check_algorithm(cfg)
    resolve_layout(cfg, args.nproc_per_node)
    if cfg.algorithm == "pretrain":
        check_data_files(cfg.data)
    return _torchrun(args.nproc_per_node, argv, max_restarts=cfg.train.max_restarts)


def _torchrun(nproc: int, argv: Sequence[str], max_restarts: int = 0) -> int:
    """Run this same command line again as ``nproc`` torchrun workers on this machine; a failed worker
    restarts the group up to ``max_restarts`` times (training resumes from its latest checkpoint)."""
    import os
    import subprocess

    forwarded = [a for a in argv if not a.startswith("--nproc-per-node")]
    if "--nproc-per-node" in argv:  # the separate-value form
        i = list(argv).index("--nproc-per-node")
        forwarded = list(argv[:i]) + list(argv[i + 2 :])
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        f"--max-restarts={max_restarts}",
        "-m", "haina.tools.cli", *forwarded,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.run(command, env=env).returncode


def _train_command(cfg: HainaConfig, args: argparse.Namespace) -> int:
    import os

    if args.nproc_per_node > 1 and "WORLD_SIZE" not in os.environ:
        return _launch_torchrun(cfg, args, args.argv)
    from haina.core.distributed import is_main_process
    from haina.core.train import train

    result = train(cfg)
    if is_main_process():
        print(f"trained {result.steps} steps; final loss {result.final_loss:.4f}; run directory {result.run_dir}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    return _train_command(_config(args), args)


def cmd_align(args: argparse.Namespace) -> int:
    from haina.core.config import alignment_config

    cfg = alignment_config(args.command, args.source, args.config, args.overrides)
    args.run_dir = cfg.train.run_dir
    return _train_command(cfg, args)


def cmd_generate(args: argparse.Namespace) -> int:
    from haina.tools.chat import run_generate

    return run_generate(args)


def cmd_chat(args: argparse.Namespace) -> int:
    from haina.tools.chat import run_chat

    return run_chat(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from haina.tools.demo.run import run_demo
    from haina.tools.demo.size import FULL, QUICK

    run_demo(Path(args.workdir), overrides=args.overrides, align=not args.no_align, size=QUICK if args.quick else FULL)
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    from haina.tools.hf.export import export_hf

    out = export_hf(args.checkpoint, args.out, args.format, dtype=args.dtype, config=args.config, tokenizer=args.tokenizer)
    print(f"{args.format} model written to {out}")
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    from haina.tools.hf.importer import import_hf

    step_dir = import_hf(args.model, args.out, args.format, base=args.config, overrides=args.overrides)
    print(f"haina checkpoint written to {step_dir}; continue with: haina pretrain --config {Path(args.out) / 'config.yaml'}")
    return 0


def cmd_import_deepspeed(args: argparse.Namespace) -> int:
    from haina.core.parallel.zero import convert_checkpoint

    step_dir = convert_checkpoint(args.checkpoint, args.out, config=args.config)
    print(f"haina checkpoint written to {step_dir}; use it as align.init_from={args.out} or export it with "
          f"haina export hf --checkpoint {args.out}")
    return 0


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    import os

    from haina.core.distributed import is_main_process
    from haina.tools.eval.perplexity import evaluate_perplexity, format_table

    if args.nproc_per_node > 1 and "WORLD_SIZE" not in os.environ:
        return _torchrun(args.nproc_per_node, args.argv)
    report = evaluate_perplexity(
        args.checkpoint, args.data, tokenizer=args.tokenizer, out=args.out, batch_size=args.batch_size,
        seq_len=args.seq_len, text_key=args.text_key, overrides=args.overrides,
    )
    if is_main_process():
        print(format_table(report))
    return 0


def cmd_eval_safety(args: argparse.Namespace) -> int:
    from haina.tools.eval.safety import run_safety

    return run_safety(args)


def cmd_rm_collect(args: argparse.Namespace) -> int:
    import os

    from haina.core.distributed import is_main_process
    from haina.tools.align_data.collect import collect, load_collect_config

    cfg = load_collect_config(args.config)
    if args.nproc_per_node > 1 and "WORLD_SIZE" not in os.environ:
        return _torchrun(args.nproc_per_node, args.argv)
    result = collect(cfg, args.overrides)
    if is_main_process():
        print(f"{result['new']} new responses; {result['records']} in {result['out']}")
    return 0


def cmd_rm_pairs(args: argparse.Namespace) -> int:
    from haina.tools.align_data.pairs import run_pairs

    return run_pairs(args)


def cmd_prompts(args: argparse.Namespace) -> int:
    from haina.tools.align_data.prompts import run_prompts

    return run_prompts(args)


def cmd_plan(args: argparse.Namespace) -> int:
    from haina.tools.plan.command import run_plan

    return run_plan(args)


def cmd_scaling_sweep(args: argparse.Namespace) -> int:
    from haina.tools.scaling_law import sweep

    result = sweep(args.ladder, args.out, base=args.config, overrides=args.overrides, budget_scale=args.budget_scale,
                   eval_data=args.eval_data)
    print(f"{len(result['points'])} runs recorded in {Path(args.out) / 'sweep.json'}")
    return 0


def cmd_scaling_fit(args: argparse.Namespace) -> int:
    from haina.tools.scaling_law import fit_command

    print(fit_command(args.sweep, args.out, holdout_largest=args.holdout_largest, target_flops=args.target_flops,
                      target_params=args.target_params, target_tokens=args.target_tokens))
    return 0


# --------------------------------------------------------------------------------------------- parser

def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """The model and sampling arguments of generate and chat."""
    parser.add_argument("--checkpoint", required=True, help="run directory, checkpoints/step_N, or an HF export")
    parser.add_argument("--prefix", default="", help="sub-model of the checkpoint, e.g. actor. for a PPO run")
    parser.add_argument("--tokenizer", help="SentencePiece model (default: the run's)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--repetition-penalty", type=float, default=1.05)
    parser.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="haina", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list registered plugins by kind, with their package")
    p.add_argument("--presets", action="store_true", help="list the shipped config presets instead")
    p.add_argument("--brief", action="store_true", help="names and packages only (no settings, no kernel report)")
    p.set_defaults(func=cmd_plugins, bad_input=BAD_INPUT)

    tok = sub.add_parser("tokenizer", help="train or evaluate the SentencePiece tokenizer").add_subparsers(
        dest="action", required=True
    )
    p = tok.add_parser("train", help="train a SentencePiece BPE tokenizer with the Baichuan 2 settings")
    p.add_argument("--input", nargs="+", required=True, help="JSONL (text field) or plain text files")
    p.add_argument("--out", required=True, help="model prefix: writes PREFIX.model and PREFIX.vocab")
    _add_config_args(p)
    p.set_defaults(func=cmd_tokenizer_train, bad_input=BAD_INPUT)
    p = tok.add_parser("report", help="compression of a tokenizer on a held-out file")
    p.add_argument("--model", required=True)
    p.add_argument("--heldout", required=True)
    p.set_defaults(func=cmd_tokenizer_report, bad_input=BAD_INPUT)

    data = sub.add_parser("data", help="data preparation").add_subparsers(dest="action", required=True)
    p = data.add_parser("prepare", help="Spark job: dedup, quality, safety, categories, sampling weights")
    p.add_argument("--input", nargs="+", required=True, help="JSONL (optionally .gz) or Parquet files/folders")
    p.add_argument("--output", required=True, help="output folder (kept/, removed/, quarantine/, report.json)")
    p.add_argument("--config", help="YAML of the job's settings (see haina.data_spark.config)")
    p.add_argument("--master", help="Spark master URL (default: local[*], or spark-submit's)")
    p.add_argument("--print-report", action="store_true", help="print report.json when done")
    p.add_argument("--max-quarantine-share", type=float, metavar="X",
                   help="stop with exit status 2 when more than this share of input records is quarantined")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of the job's config")
    p.set_defaults(func=cmd_data_prepare, bad_input=BAD_INPUT)
    p = data.add_parser("tokenize", help="text to Megatron .bin/.idx; a prepared output to weighted shards + blend.json")
    p.add_argument("--prepared", help="a `haina data prepare` output: tokenize its kept documents in Spark")
    p.add_argument("--master", help="Spark master URL for --prepared")
    p.add_argument("--input", nargs="+", help="JSONL/Parquet files (without --prepared)")
    p.add_argument("--output", help="output prefix (writes PREFIX.bin and PREFIX.idx)")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model file")
    p.add_argument("--text-key", default="text")
    p.set_defaults(func=cmd_data_tokenize, bad_input=BAD_INPUT)

    p = sub.add_parser("pretrain", help="pre-train a model (under torchrun, or --nproc-per-node N)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="start torchrun with N workers on this machine")
    _add_config_args(p)
    p.set_defaults(func=cmd_pretrain, bad_input=BAD_INPUT)

    for name, help_text in (
        ("sft", "supervised fine-tuning on chat conversations (loss on assistant replies)"),
        ("rm", "train a reward model on preference pairs"),
        ("ppo", "RLHF with PPO: actor, critic, frozen reference and reward model"),
        ("dpo", "direct preference optimisation against a frozen reference"),
        ("grpo", "GRPO: group-normalised advantages over n samples per prompt, no critic"),
        ("rloo", "RLOO: leave-one-out baselines over n samples per prompt, no critic"),
        ("reinforce_pp", "REINFORCE++: per-token KL in the reward, batch-normalised advantages, no critic"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--from", dest="source", help="run directory to start from (its config and latest checkpoint)")
        p.add_argument("--nproc-per-node", type=int, default=1, help="start torchrun with N workers on this machine")
        _add_config_args(p)
        p.set_defaults(func=cmd_align, bad_input=BAD_INPUT)

    p = sub.add_parser("rm-collect", help="(haina rm collect) responses to prompts from several models and settings")
    p.add_argument("--config", required=True, help="YAML: prompts, out, models [{name, checkpoint, prefix}], settings")
    p.add_argument("--nproc-per-node", type=int, default=1, help="start torchrun with N workers on this machine")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="layout: parallel.tp=2 (and train.precision)")
    p.set_defaults(func=cmd_rm_collect, bad_input=BAD_INPUT)

    p = sub.add_parser("rm-pairs", help="(haina rm pairs) chosen/rejected pairs from scored responses")
    p.add_argument("--responses", required=True, help="JSONL of haina rm collect")
    p.add_argument("--out", required=True, help="JSONL of pairs for haina rm / haina dpo")
    p.add_argument("--labels", help="JSONL of {id, score} or {id, rank} (rank 1 best)")
    p.add_argument("--reward-model", help="reward-model run directory that scores the responses")
    p.add_argument("--verifier", help="module:function(record, response) -> score")
    p.add_argument("--min-gap", type=float, default=0.0, help="smallest score difference that makes a pair")
    p.add_argument("--max-pairs-per-prompt", type=int, default=0, help="keep the widest gaps (0: all)")
    p.set_defaults(func=cmd_rm_pairs, bad_input=BAD_INPUT)

    p = sub.add_parser("prompts", help="prompt taxonomy: assign categories, coverage and diversity, stratified sample")
    p.add_argument("--prompts", required=True, help="JSONL of prompts (prompt or text; optional category)")
    p.add_argument("--taxonomy", help="YAML {top: {middle: [leaf or {name, description, keywords}]}} (default: built-in)")
    p.add_argument("--assign", default="given", choices=("given", "rules", "classifier"))
    p.add_argument("--labelled", help="JSONL of prompts with categories to train the classifier on")
    p.add_argument("--min-count", type=int, default=5, help="categories with fewer prompts are reported")
    p.add_argument("--report", help="write the coverage report as JSON")
    p.add_argument("--sample", type=int, help="stratified sample of N prompts, under-covered categories first")
    p.add_argument("--out", help="JSONL for the sample")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_prompts, bad_input=BAD_INPUT)

    export = sub.add_parser("export", help="export a checkpoint").add_subparsers(dest="action", required=True)
    p = export.add_parser("hf", help="checkpoint (any parallel layout) -> Hugging Face safetensors + config")
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoints/step_N")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--format", default="llama", choices=("llama", "baichuan"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--tokenizer", help="SentencePiece model to ship (default: the run's data.tokenizer)")
    p.add_argument("--config", help="config of the run, if its config.yaml is not above the checkpoint")
    p.set_defaults(func=cmd_export_hf, bad_input=BAD_INPUT)

    imp = sub.add_parser("import", help="import weights").add_subparsers(dest="action", required=True)
    p = imp.add_parser("hf", help="Hugging Face Llama / Baichuan 2 directory -> haina run directory to train on")
    p.add_argument("--model", required=True, help="model directory (config.json + safetensors or .bin)")
    p.add_argument("--out", required=True, help="new run directory (config.yaml + checkpoints/step_0)")
    p.add_argument("--format", choices=("llama", "baichuan"), help="default: config.json's model_type")
    _add_config_args(p)
    p.set_defaults(func=cmd_import_hf, bad_input=BAD_INPUT)
    p = imp.add_parser("deepspeed", help="DeepSpeed (ZeRO) checkpoint of a dp_backend=deepspeed run -> haina run directory")
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoints/step_N")
    p.add_argument("--out", required=True, help="new run directory (config.yaml + checkpoints/step_N)")
    p.add_argument("--config", help="config of the run, if its config.yaml is not above the checkpoint")
    p.set_defaults(func=cmd_import_deepspeed, bad_input=BAD_INPUT)

    ev = sub.add_parser("eval", help="evaluate a model").add_subparsers(dest="action", required=True)
    p = ev.add_parser("ppl", help="perplexity per source and overall on JSONL or .bin/.idx data")
    p.add_argument("--checkpoint", required=True, help="run directory, checkpoints/step_N, or an HF export")
    p.add_argument("--data", nargs="+", required=True, help="JSONL files (text, optional source) or .bin/.idx prefixes")
    p.add_argument("--tokenizer", help="SentencePiece model for JSONL (default: the run's data.tokenizer)")
    p.add_argument("--out", help="JSON report (default: ppl.json in the checkpoint directory)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, help="window length (default: the model's max_seq_len)")
    p.add_argument("--text-key", default="text")
    p.add_argument("--nproc-per-node", type=int, default=1, help="start torchrun with N workers on this machine")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="layout: parallel.tp=2, parallel.pp=2, train.precision=bf16")
    p.set_defaults(func=cmd_eval_ppl, bad_input=BAD_INPUT)
    p = ev.add_parser("safety", help="harmless rate per safety category and attack type (one model or before/after)")
    p.add_argument("--checkpoint", required=True, help="run directory, checkpoints/step_N, or an HF export")
    p.add_argument("--prefix", default="", help="sub-model of the checkpoint (actor. of a PPO run)")
    p.add_argument("--compare", help="a second model, reported as 'before' (the --checkpoint is 'after')")
    p.add_argument("--compare-prefix", default="")
    p.add_argument("--prompts", help="JSONL attack prompts (prompt, category, attack); default: the built-in set")
    p.add_argument("--judge", default="refusal", help="refusal, words, classifier:PATH or reward-model:RUN")
    p.add_argument("--threshold", type=float, default=0.0, help="reward-model judge: harmless at or above this score")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--tokenizer", help="SentencePiece model (default: the model's own)")
    p.add_argument("--out", required=True, help="folder for safety.json and safety.png")
    p.set_defaults(func=cmd_eval_safety, bad_input=BAD_INPUT)

    p = sub.add_parser("plan", help="per-rank memory and step time of a run on a GPU type, before launching it")
    from haina.tools.plan.command import add_arguments as add_plan_arguments

    add_plan_arguments(p)
    _add_config_args(p)
    p.set_defaults(func=cmd_plan, bad_input=BAD_INPUT)

    sl = sub.add_parser("scaling-law", help="scaling-law ladder and fit").add_subparsers(dest="action", required=True)
    p = sl.add_parser("sweep", help="train a ladder of model sizes for a FLOP budget each; record (compute, loss)")
    p.add_argument("--ladder", default="cpu", help="cpu (five small sizes), baichuan2 (the report's seven), or a YAML file")
    p.add_argument("--out", required=True, help="sweep directory (runs and sweep.json)")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every rung's FLOP budget")
    p.add_argument("--eval-data", help=".bin/.idx prefix: score each run on it (default: the last steps' training loss)")
    _add_config_args(p)
    p.set_defaults(func=cmd_scaling_sweep, bad_input=BAD_INPUT)
    p = sl.add_parser("fit", help="fit L(C) = a*C^b + L_inf to a sweep; plot and predict")
    p.add_argument("--sweep", required=True, help="sweep.json of `haina scaling-law sweep`")
    p.add_argument("--out", help="output prefix (default: fit beside sweep.json) -> PREFIX.json, PREFIX.png")
    p.add_argument("--holdout-largest", action="store_true", help="fit without the largest run and predict it")
    p.add_argument("--target-flops", type=float, help="predict the loss at this training compute")
    p.add_argument("--target-params", type=float, help="with --target-tokens: compute = 6 * params * tokens")
    p.add_argument("--target-tokens", type=float)
    p.set_defaults(func=cmd_scaling_fit, bad_input=BAD_INPUT)

    p = sub.add_parser("generate", help="continue text prompts with a checkpoint or an HF export")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts", help="a file with one prompt per line")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_generate, bad_input=BAD_INPUT)
    p = sub.add_parser("chat", help="chat with a model in the chat format (role tokens), keeping the conversation")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_chat, bad_input=BAD_INPUT)

    p = sub.add_parser("demo", help="end to end on embedded data: corpus, Spark prep, tokenizer, pretrain, SFT, RM, PPO")
    p.add_argument("--workdir", default="runs/demo", help="where the corpus, tokenizer, data and run go")
    p.add_argument("--no-align", action="store_true", help="stop after pretraining (skip SFT, RM and PPO)")
    p.add_argument("--quick", action="store_true", help="every stage at its smallest size (seconds of training)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of the demo preset")
    p.set_defaults(func=cmd_demo, bad_input=BAD_INPUT)
    return parser


def _log_failure(args: argparse.Namespace) -> Path:
    """Write the current exception's traceback where the user will look: the run's ``logs/`` folder when
    the command has a run directory, else the temporary folder; return the file."""
    rank = os.environ.get("RANK", "0")
    run_dir = getattr(args, "run_dir", None)
    folder = Path(run_dir) / "logs" if run_dir else Path(tempfile.gettempdir())
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"haina-{args.command}-error-rank{rank}-{os.getpid()}.log"
        path.write_text(traceback.format_exc(), encoding="utf-8")
    except OSError:  # nowhere to write: the traceback goes to stderr after all
        traceback.print_exc()
        return Path("<stderr>")
    return path


def run(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["rm"] and argv[1:2] in (["collect"], ["pairs"]):  # `haina rm collect` is rm-collect
        argv = [f"rm-{argv[1]}", *argv[2:]]
    args = build_parser().parse_args(argv)
    args.argv = argv
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except args.bad_input as exc:
        print(f"haina {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"haina {args.command}: interrupted", file=sys.stderr)
        return 130
    except BaseException as exc:  # Exception, and torch's CheckpointException (a BaseException)
        if not isinstance(exc, Exception) and type(exc).__name__ != "CheckpointException":
            raise  # SystemExit, injected test faults
        log = _log_failure(args)
        print(f"haina {args.command}: failed: {type(exc).__name__}: {one_line(exc)} (traceback: {log})",
              file=sys.stderr)
        return 1


def main() -> None:
    try:
        if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: let the agent see the failure's error file
            from torch.distributed.elastic.multiprocessing.errors import record

            code = record(run)()
        else:
            code = run()
    finally:
        if "torch.distributed" in sys.modules:  # only a command that used it pays for the import
            from haina.core.distributed import close_distributed

            close_distributed()
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker whose work is done: no exit-time teardown
        from haina.core.distributed import end_worker

        end_worker(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
