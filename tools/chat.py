"""``haina generate`` and ``haina chat``: sample from a checkpoint (any layout) or a Hugging Face export.

``generate`` continues raw text; ``chat`` renders the conversation with the tokenizer's user and
assistant role tokens, keeps every turn, and generates each reply as the model was trained to.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from haina.core.errors import ConfigError, InputFileError
from haina.core.generate import Sampling, generate
from haina.core.model import Transformer
from haina.core.model_loading import load_model
from haina.core.tokenizer import load_tokenizer
from haina.plugins.align.chat_format import render_prompt


def generate_texts(model: Transformer, tokenizer: Any, prompts: list[str], sampling: Sampling) -> list[str]:
    ids = [tokenizer.encode(p) or [tokenizer.bos_id] for p in prompts]
    replies = generate(model, ids, sampling, eos_id=tokenizer.eos_id, vocab_limit=tokenizer.vocab_size)
    return [tokenizer.decode([t for t in r if t != tokenizer.eos_id]) for r in replies]


def chat_loop(
    model: Transformer, tokenizer: Any, sampling: Sampling, lines: Iterable[str], say: Callable[[str], None]
) -> list[dict[str, str]]:
    """One reply per user line; the whole conversation is the context of each reply. Returns the turns."""
    turns: list[dict[str, str]] = []
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            turns = []
            continue
        turns.append({"role": "user", "content": text})
        context = render_prompt(turns, tokenizer)[-(model.cfg.max_seq_len - sampling.max_new_tokens) :]
        (reply,) = generate(model, [context], sampling, eos_id=tokenizer.eos_id, vocab_limit=tokenizer.vocab_size)
        answer = tokenizer.decode([t for t in reply if t != tokenizer.eos_id])
        turns.append({"role": "assistant", "content": answer})
        say(answer)
    return turns


def run_generate(args: Any) -> int:
    if args.prompts and not Path(args.prompts).is_file():
        raise InputFileError(f"--prompts {args.prompts}: no such file")
    prompts = list(args.prompt or []) + (Path(args.prompts).read_text(encoding="utf-8").splitlines() if args.prompts else [])
    if not prompts:
        raise ConfigError("generate: give --prompt TEXT (repeatable) or --prompts FILE")
    cfg, model = load_model(args.checkpoint, prefix=args.prefix)
    tokenizer = load_tokenizer(cfg, args.tokenizer)
    for prompt, text in zip(prompts, generate_texts(model, tokenizer, prompts, sampling_of(args)), strict=True):
        print(f"{prompt}{text}")
    return 0


def run_chat(args: Any) -> int:
    cfg, model = load_model(args.checkpoint, prefix=args.prefix)
    tokenizer = load_tokenizer(cfg, args.tokenizer)
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat: type a message; /reset starts over, /exit ends", flush=True)

    def lines() -> Iterable[str]:
        while True:
            if interactive:
                print("you> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line:
                return
            yield line

    chat_loop(model, tokenizer, sampling_of(args), lines(), lambda text: print(f"model> {text}", flush=True))
    return 0


def sampling_of(args: Any) -> Sampling:
    return Sampling(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed,
    )
