"""``haina generate`` and ``haina chat`` on a small trained checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from haina.core.generate import Sampling
from haina.core.model_loading import load_model
from haina.core.tokenizer import load_tokenizer
from haina.tools.chat import chat_loop, generate_texts
from tests.alignment_helpers import haina, make_alignment_data

pytestmark = pytest.mark.integration  # the module fixture trains a checkpoint through the CLI


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("chat")
    data = make_alignment_data(root / "data")
    haina("pretrain", "--config", "tiny", f"train.run_dir={root / 'pt'}", f"data.prefixes=[{data.pretrain_prefix}]",
          f"data.tokenizer={data.tokenizer}", "train.steps=3", "train.save_every=100")
    return root / "pt"


def test_generation_is_deterministic_for_a_seed(run: Path) -> None:
    cfg, model = load_model(run)
    tok = load_tokenizer(cfg)
    hot = Sampling(max_new_tokens=6, temperature=1.0, top_k=30, seed=5)
    first = generate_texts(model, tok, ["What is 3 + 4?", "Reverse the word: cat"], hot)
    assert first == generate_texts(model, tok, ["What is 3 + 4?", "Reverse the word: cat"], hot)
    assert len(first) == 2


def test_chat_keeps_the_conversation(run: Path) -> None:
    cfg, model = load_model(run)
    tok = load_tokenizer(cfg)
    said: list[str] = []
    turns = chat_loop(model, tok, Sampling(max_new_tokens=4, temperature=0), ["What is 1 + 1?", "", "And 2 + 2?",
                                                                           "/exit", "never read"], said.append)
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant"]
    assert [t["content"] for t in turns[1::2]] == said
    assert turns[2]["content"] == "And 2 + 2?"


def test_cli_generate_and_chat(run: Path) -> None:
    out = haina("generate", "--checkpoint", str(run), "--prompt", "What is 2 + 2?", "--max-new-tokens", "4",
                "--temperature", "0")
    assert out.stdout.startswith("What is 2 + 2?")
    chat = subprocess.run(
        [sys.executable, "-m", "haina.tools.cli", "chat", "--checkpoint", str(run), "--max-new-tokens", "3"],
        input="hello\n/exit\n", capture_output=True, text=True, timeout=120,
    )
    assert chat.returncode == 0 and chat.stdout.count("model> ") == 1
    bad = subprocess.run(
        [sys.executable, "-m", "haina.tools.cli", "generate", "--checkpoint", str(run)],
        capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 2 and "give --prompt" in bad.stderr and bad.stderr.strip().count("\n") == 0
