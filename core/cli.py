"""The ``haina`` command: one entry point, a subcommand per job.

Exit status: 0 on success, 2 on bad input (one line on stderr saying what and where), 1 when the work
itself fails.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from haina.core.config import ConfigError, HainaConfig, alignment_config, load_config
from haina.plugins.registry import PluginError

BAD_INPUT: tuple[type[BaseException], ...] = (ConfigError, PluginError)
# Commands that read user files also count these as bad input rather than as failures of the work.
BAD_FILE_INPUT: tuple[type[BaseException], ...] = (*BAD_INPUT, ValueError, FileNotFoundError)


def _config(args: argparse.Namespace) -> HainaConfig:
    return load_config(args.config, args.overrides)


def _add_config_args(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument("--config", default=default, help="YAML file or preset name (haina plugins --presets)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. model.position=alibi")


# ------------------------------------------------------------------------------------------- commands

def cmd_plugins(args: argparse.Namespace) -> int:
    from haina.core.config import preset_names
    from haina.plugins import registry

    if args.presets:
        print("\n".join(preset_names()))
        return 0
    rows = [(e.kind, e.name, e.package) for e in registry.entries()]
    width = max(len(name) for _, name, _ in rows)
    current = None
    for kind, name, package in rows:
        if kind != current:
            print(f"{kind}:")
            current = kind
        print(f"  {name:<{width}}  ({package})")
    return 0


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


def cmd_data_tokenize(args: argparse.Namespace) -> int:
    from haina.data_spark.tokenize import tokenize_to_indexed

    stats = tokenize_to_indexed(
        [Path(p) for p in args.input], Path(args.output), Path(args.tokenizer), text_key=args.text_key
    )
    print(" ".join(f"{k}={v}" for k, v in stats.items()))
    return 0


def _launch_torchrun(cfg: HainaConfig, args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``--nproc-per-node N`` on one machine: check the layout here, then let torchrun start N workers."""
    import os
    import subprocess

    from haina.core.parallel.mesh import resolve_layout
    from haina.core.train import check_algorithm

    check_algorithm(cfg)
    resolve_layout(cfg, args.nproc_per_node)
    forwarded = [a for a in argv if not a.startswith("--nproc-per-node")]
    if "--nproc-per-node" in argv:  # the separate-value form
        i = list(argv).index("--nproc-per-node")
        forwarded = list(argv[:i]) + list(argv[i + 2 :])
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc_per_node}",
        "-m", "haina.core.cli", *forwarded,
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
    return _train_command(alignment_config(args.command, args.source, args.config, args.overrides), args)


def cmd_demo(args: argparse.Namespace) -> int:
    from haina.tools.demo import run_demo

    run_demo(Path(args.workdir), overrides=args.overrides)
    return 0


# --------------------------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="haina", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list registered plugins by kind, with their package")
    p.add_argument("--presets", action="store_true", help="list the shipped config presets instead")
    p.set_defaults(func=cmd_plugins, bad_input=BAD_INPUT)

    tok = sub.add_parser("tokenizer", help="train or evaluate the SentencePiece tokenizer").add_subparsers(
        dest="action", required=True
    )
    p = tok.add_parser("train", help="train a SentencePiece BPE tokenizer with the Baichuan 2 settings")
    p.add_argument("--input", nargs="+", required=True, help="JSONL (text field) or plain text files")
    p.add_argument("--out", required=True, help="model prefix: writes PREFIX.model and PREFIX.vocab")
    _add_config_args(p)
    p.set_defaults(func=cmd_tokenizer_train, bad_input=BAD_FILE_INPUT)
    p = tok.add_parser("report", help="compression of a tokenizer on a held-out file")
    p.add_argument("--model", required=True)
    p.add_argument("--heldout", required=True)
    p.set_defaults(func=cmd_tokenizer_report, bad_input=BAD_FILE_INPUT)

    data = sub.add_parser("data", help="data preparation").add_subparsers(dest="action", required=True)
    p = data.add_parser("tokenize", help="JSONL/Parquet text to Megatron .bin/.idx")
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--output", required=True, help="output prefix (writes PREFIX.bin and PREFIX.idx)")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model file")
    p.add_argument("--text-key", default="text")
    p.set_defaults(func=cmd_data_tokenize, bad_input=BAD_FILE_INPUT)

    p = sub.add_parser("pretrain", help="pre-train a model (under torchrun, or --nproc-per-node N)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="start torchrun with N workers on this machine")
    _add_config_args(p)
    p.set_defaults(func=cmd_pretrain, bad_input=BAD_INPUT)

    for name, help_text in (
        ("sft", "supervised fine-tuning on chat conversations (loss on assistant replies)"),
        ("rm", "train a reward model on preference pairs"),
        ("ppo", "RLHF with PPO: actor, critic, frozen reference and reward model"),
        ("dpo", "direct preference optimisation against a frozen reference"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--from", dest="source", help="run directory to start from (its config and latest checkpoint)")
        p.add_argument("--nproc-per-node", type=int, default=1, help="start torchrun with N workers on this machine")
        _add_config_args(p)
        p.set_defaults(func=cmd_align, bad_input=BAD_FILE_INPUT)

    p = sub.add_parser("demo", help="end to end on embedded data: corpus, tokenizer, tokenize, pretrain")
    p.add_argument("--workdir", default="runs/demo", help="where the corpus, tokenizer, data and run go")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of the demo preset")
    p.set_defaults(func=cmd_demo, bad_input=BAD_INPUT)
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except args.bad_input as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"haina {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"haina {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(f"haina {args.command}: failed (see the traceback above)", file=sys.stderr)
        return 1


def main() -> None:
    from torch.distributed.elastic.multiprocessing.errors import record

    sys.exit(record(run)())


if __name__ == "__main__":
    main()
