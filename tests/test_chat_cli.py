"""``haina generate`` and ``haina chat`` on a small trained checkpoint."""

from __future__ import annotations

import io
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

import haina.tools.chat as chat_module
from haina.core.generate import Sampling
from haina.core.model_loading import load_model
from haina.core.tokenizer import load_tokenizer
from haina.tools.chat import chat_loop, generate_texts
from tests.cli_helpers import cli_here

pytestmark = pytest.mark.integration  # the module fixture trains a checkpoint through the CLI


@pytest.fixture(scope="module")
def run(alignment_runs: dict) -> Path:
    """The session's tiny pretraining run (tests/conftest.py)."""
    return alignment_runs["pt"]


def _render_by_hand(tok: Any, turns: list[tuple[str, str]]) -> list[int]:
    """The chat format written out: ``<user> text`` per user turn, ``<assistant> reply <eos>`` per reply,
    then the ``<assistant>`` token the next reply is generated after."""
    ids: list[int] = []
    for role, text in turns:
        if role == "user":
            ids += [tok.user_id, *tok.encode(text)]
        else:
            ids += [tok.assistant_id, *tok.encode(text), tok.eos_id]
    return [*ids, tok.assistant_id]


@torch.no_grad()
def _greedy_by_hand(model: torch.nn.Module, prompt: list[int], steps: int, eos: int, vocab: int) -> list[int]:
    """Greedy decoding without a KV cache or padding: the whole sequence through the model each step."""
    ids, out = list(prompt), []
    for _ in range(steps):
        token = int(model.logits(model(torch.tensor([ids])))[0, -1, :vocab].argmax())
        out.append(token)
        if token == eos:
            break
        ids.append(token)
    return out


def _text(tok: Any, ids: list[int]) -> str:
    return tok.decode([t for t in ids if t != tok.eos_id])


def test_generation_is_seeded_and_follows_the_prompt(run: Path) -> None:
    cfg, model = load_model(run)
    tok = load_tokenizer(cfg)
    prompts = ["What is 3 + 4?", "Reverse the word: cat"]
    hot = Sampling(max_new_tokens=8, temperature=3.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=5)
    first = generate_texts(model, tok, prompts, hot)
    assert first == generate_texts(model, tok, prompts, hot)  # same seed, same samples
    other = generate_texts(model, tok, prompts, replace(hot, seed=6))
    # 8 draws at temperature 3 from a 400-token vocabulary: two seeds agreeing on a row is (nearly) impossible
    assert all(a != b for a, b in zip(first, other, strict=True)), (first, other)
    # Greedy: each prompt's continuation is the model's own, as an uncached, unpadded decode gives it, and
    # it depends on the prompt (the batch is left-padded to the longest prompt; padding changes nothing).
    many = ["What is 3 + 4?", "Reverse the word: cat", "hello", "What is 12 + 30? Answer with a number only"]
    greedy = generate_texts(model, tok, many, Sampling(max_new_tokens=5, temperature=0, repetition_penalty=1.0))
    by_hand = [_text(tok, _greedy_by_hand(model, tok.encode(p), 5, tok.eos_id, tok.vocab_size)) for p in many]
    assert greedy == by_hand
    assert len(set(by_hand)) > 1, by_hand


def test_chat_keeps_the_conversation(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Spies on what the model is handed: turn 2's context is turn 1's question and reply (in the chat
    format) and then turn 2's question; /reset forgets; every reply is the model's greedy continuation."""
    cfg, model = load_model(run)
    tok = load_tokenizer(cfg)
    events: list[tuple[str, Any]] = []

    def on_forward(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        events.append(("forward", args[0].tolist()))

    model.register_forward_pre_hook(on_forward, with_kwargs=True)
    real_generate = chat_module.generate

    def spy_generate(*args: Any, **kwargs: Any) -> list[list[int]]:
        replies = real_generate(*args, **kwargs)
        events.append(("reply", replies[0]))
        return replies

    monkeypatch.setattr(chat_module, "generate", spy_generate)
    said: list[str] = []

    def say(text: str) -> None:
        said.append(text)
        events.append(("said", text))

    lines = ["What is 1 + 1?", "", "And 2 + 2?", "/reset", "Reverse the word: cat", "/exit", "never read"]
    turns = chat_loop(model, tok, Sampling(max_new_tokens=4, temperature=0, repetition_penalty=1.0), lines, say)
    assert [t["role"] for t in turns] == ["user", "assistant"]  # what is left after /reset
    assert turns[0]["content"] == "Reverse the word: cat" and turns[1]["content"] == said[2]

    contexts: list[list[int]] = []  # the prefill of each turn: its first forward (batch of one, no padding)
    replies: list[list[int]] = []
    new_turn = True
    for kind, value in events:
        if kind == "forward" and new_turn:
            assert len(value) == 1
            contexts.append(value[0])
            new_turn = False
        elif kind == "reply":
            replies.append(value)
        elif kind == "said":
            new_turn = True
    assert len(contexts) == len(replies) == len(said) == 3
    assert said[0], "an empty first reply would make the context check below trivial"
    assert contexts[0] == _render_by_hand(tok, [("user", "What is 1 + 1?")])
    assert contexts[1] == _render_by_hand(
        tok, [("user", "What is 1 + 1?"), ("assistant", said[0]), ("user", "And 2 + 2?")]
    )
    assert contexts[2] == _render_by_hand(tok, [("user", "Reverse the word: cat")])
    for context, reply, text in zip(contexts, replies, said, strict=True):
        assert reply == _greedy_by_hand(model, context, 4, tok.eos_id, tok.vocab_size)
        assert text == _text(tok, reply)


def test_cli_generate_and_chat(run: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = cli_here(capsys, "generate", "--checkpoint", str(run), "--prompt", "What is 2 + 2?",
                              "--max-new-tokens", "4", "--temperature", "0")
    assert code == 0 and out.startswith("What is 2 + 2?"), err
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/exit\n"))  # a user typing one turn, then /exit
    code, out, err = cli_here(capsys, "chat", "--checkpoint", str(run), "--max-new-tokens", "3")
    assert code == 0 and out.count("model> ") == 1, out + err
    code, _, err = cli_here(capsys, "generate", "--checkpoint", str(run))
    assert code == 2 and "give --prompt" in err and err.strip().count("\n") == 0, err
