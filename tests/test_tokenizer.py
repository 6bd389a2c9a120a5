"""The Baichuan 2 tokenizer settings hold on a small model: exact round trips, digits, bytes, specials."""

from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path

import pytest

from haina.core.config import TokenizerConfig
from haina.core.errors import ConfigError, InputFileError
from haina.tools.tokenizer import SPACE, Tokenizer, compression_report, format_report, train_tokenizer

CODE = (
    "def walk(tree, depth=0):\n"
    "\tfor node in tree:\n"
    "\t\tif node.children:\n"
    "\t\t\twalk(node.children, depth + 1)\n"
    "    return  depth    # four spaces, then two\n"
    "        value = {'key': [1, 2, 3]}\n"
)


def _training_text() -> str:
    """English prose, code and a little Chinese, generated from what ships with Python."""
    from pydoc_data.topics import topics

    english = "\n".join(topics[name] for name in sorted(topics)[:12])
    chinese = "深度学习模型需要大量的训练数据。\n我们使用中文和英文的语料训练分词器。\n" * 20
    return english + "\n" + CODE * 30 + chinese + "numbers 0 1 2 3 4 5 6 7 8 9 2024\n" * 5


@pytest.fixture(scope="module")
def cfg() -> TokenizerConfig:
    return TokenizerConfig(vocab_size=512, seed=7)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, cfg: TokenizerConfig) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    source = folder / "train.txt"
    source.write_text(_training_text(), encoding="utf-8")
    return train_tokenizer([source], folder / "small", cfg)


@pytest.fixture(scope="module")
def tok(trained: Path) -> Tokenizer:
    return Tokenizer(trained)


def _random_text(rng: random.Random, length: int) -> str:
    """Code points from every plane that is assigned, including controls and combining marks."""
    ranges = [(0x00, 0x7F), (0x80, 0x2FF), (0x300, 0x36F), (0x2580, 0x25FF), (0x4E00, 0x9FFF),
              (0xAC00, 0xD7A3), (0xE000, 0xF8FF), (0xFF00, 0xFFEF), (0x1F300, 0x1FAFF), (0x20000, 0x2A6DF)]
    out = []
    for _ in range(length):
        low, high = rng.choice(ranges)
        out.append(chr(rng.randint(low, high)))
    return "".join(out)


ODD_STRINGS = [
    "",
    "a",
    " leading and trailing spaces  ",
    "emoji 😀👍🏽 family 👨\u200d👩\u200d👧 flag 🇨🇳",
    "unseen CJK 鼹鼠饕餮 and ext-B 𠀀𪚥",
    "combining e\u0301 a\u0308 Z\u0324\u0354\u0367\u0311 hangul \u1100\u1161",
    "controls \r\n \x00 \x07 \x1b[0m \x7f \u2028 \u200b \ufeff",
    "sentencepiece's own space mark ▁ alone, ▁▁ twice, and ▁x",
    "full width ＡＢＣ１２３ ligature ﬁ circled ① angstrom \u212b roman Ⅻ",
    "mixed\ttabs\t\tand   spaces\n\n\nnew lines",
    "right to left שלום مرحبا",
    "<reserved_106>hello<reserved_107>world",
]


def test_round_trip_every_string(tok: Tokenizer) -> None:
    for text in ODD_STRINGS:
        assert tok.decode(tok.encode(text)) == text, repr(text)
    rng = random.Random(0)
    fuzz = [_random_text(rng, rng.randint(1, 40)) for _ in range(300)]
    for text in fuzz:
        assert tok.decode(tok.encode(text)) == text, repr(text)
    batch = ODD_STRINGS + fuzz
    assert tok.encode_batch(batch) == [tok.encode(t) for t in batch]


def test_code_round_trips_with_whitespace_pieces(tok: Tokenizer, cfg: TokenizerConfig) -> None:
    assert tok.decode(tok.encode(CODE)) == CODE
    for run in cfg.whitespace_pieces:
        assert tok.piece_to_id(SPACE * run) != tok.unk_id
        assert tok.encode("x" + " " * run + "y")[1:-1] == [tok.piece_to_id(SPACE * run)]
    assert tok.encode("\t") == [tok.piece_to_id("\t")]
    assert tok.encode("\t\t") == [tok.piece_to_id("\t\t")]
    assert tok.encode("\n") == [tok.piece_to_id("\n")]
    assert all(not tok.is_byte(i) for i in tok.encode(CODE))


def test_digits_are_single_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("12345")
    assert [tok.decode([i]) for i in ids] == list("12345")
    ids = tok.encode("year 2024.")
    assert [tok.decode([i]) for i in ids if tok.decode([i]).isdigit()] == list("2024")


def test_unseen_characters_fall_back_to_bytes(tok: Tokenizer) -> None:
    for char in "鼹😀\u212b":
        ids = tok.encode(char)
        assert len(ids) == len(char.encode("utf-8"))
        assert all(tok.is_byte(i) for i in ids)
    assert tok.unk_id not in tok.encode("鼹鼠 ☃ \x00")


def test_no_dummy_prefix_and_no_normalization(tok: Tokenizer) -> None:
    ids = tok.encode("a")
    assert ids == [tok.piece_to_id("a")]
    assert not tok.id_to_piece(ids[0]).startswith(SPACE)
    assert tok.id_to_piece(tok.encode(" a")[0]).startswith(SPACE)
    for text in ["ＡＢＣ", "ﬁ", "①", "\u212b", "e\u0301"]:
        assert unicodedata.normalize("NFKC", text) != text
        assert tok.decode(tok.encode(text)) == text
        assert tok.encode(text) != tok.encode(unicodedata.normalize("NFKC", text))


def test_special_ids(tok: Tokenizer) -> None:
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, -1)
    assert [tok.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert tok.vocab_size == len(tok) <= 512
    assert not any(i in (tok.bos_id, tok.eos_id) for i in tok.encode("text"))


def test_chat_role_tokens_are_single_ids(tok: Tokenizer, cfg: TokenizerConfig) -> None:
    assert tok.encode(cfg.user_token) == [tok.user_id]
    assert tok.encode(cfg.assistant_token) == [tok.assistant_id]
    assert tok.user_id != tok.assistant_id
    ids = tok.encode(f"{cfg.user_token}hi{cfg.assistant_token}hello")
    assert ids[0] == tok.user_id and tok.assistant_id in ids


def test_training_is_deterministic(tmp_path: Path, trained: Path, cfg: TokenizerConfig) -> None:
    source = tmp_path / "train.txt"
    source.write_text(_training_text(), encoding="utf-8")
    first = train_tokenizer([source], tmp_path / "same", cfg).read_bytes()
    second = train_tokenizer([source], tmp_path / "same", cfg).read_bytes()
    assert first == second
    assert not list(tmp_path.glob(".*sentences*")), "training leaves no temporary files"
    reference = Tokenizer(trained)
    again = Tokenizer(tmp_path / "same.model")
    assert [reference.id_to_piece(i) for i in range(len(reference))] == [
        again.id_to_piece(i) for i in range(len(again))
    ]


def test_training_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="not found"):
        train_tokenizer([tmp_path / "missing.jsonl"], tmp_path / "x", TokenizerConfig(vocab_size=512))
    rich = tmp_path / "cjk.txt"
    rich.write_text("".join(chr(0x4E00 + i) for i in range(600)) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="vocab_size 300 is too small"):
        train_tokenizer([rich], tmp_path / "x", TokenizerConfig(vocab_size=300, character_coverage=1.0))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": "no text key"}) + "\n", encoding="utf-8")
    with pytest.raises(InputFileError, match="bad.jsonl:1: record has no 'text' field"):
        train_tokenizer([bad], tmp_path / "x", TokenizerConfig(vocab_size=512))


def test_compression_report_is_consistent(tmp_path: Path, trained: Path, tok: Tokenizer) -> None:
    heldout = tmp_path / "heldout.jsonl"
    records = [
        {"text": "The quick brown fox jumps over the lazy dog.", "source": "en"},
        {"text": CODE, "source": "code"},
        {"text": "我们使用中文语料。", "source": "zh"},
        {"text": "", "source": "zh"},
    ]
    heldout.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    report = compression_report(trained, heldout)
    assert report["bytes"] == sum(len(r["text"].encode("utf-8")) for r in records)
    assert report["tokens"] == sum(len(tok.encode(r["text"])) for r in records)
    assert report["tokens_per_byte"] * report["bytes_per_token"] == pytest.approx(1.0)
    assert report["documents"] == 3
    assert set(report["by_source"]) == {"en", "code", "zh"}
    for key in ("documents", "bytes", "tokens"):
        assert sum(s[key] for s in report["by_source"].values()) == report[key]
    for stats in report["by_source"].values():
        assert stats["tokens_per_byte"] * stats["bytes_per_token"] == pytest.approx(1.0)
    table = format_report(report)
    assert "tokens/byte" in table and "\nall " in table and "\ncode " in table

    plain = tmp_path / "heldout.txt"
    plain.write_text(CODE, encoding="utf-8")
    report = compression_report(trained, plain)
    assert report["tokens"] == len(tok.encode(CODE))
    assert "by_source" not in report
