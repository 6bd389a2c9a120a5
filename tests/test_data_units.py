"""Pure-Python parts of the data job: MinHash vs datasketch, LSH parameters, rules, weights."""

from __future__ import annotations

import numpy as np
import pytest
from datasketch import MinHash
from datasketch.lsh import _optimal_param

from haina.core.errors import ConfigError
from haina.data_spark.config import HeuristicsConfig, load_prepare_config
from haina.data_spark.minhash import MinHasher, band_keys, candidate_probability, lsh_params, shingles
from haina.data_spark.rules import clean_lines, document_reason
from haina.data_spark.stages.line_dedup import rebuild, split_units
from haina.data_spark.stages.weighting import bucket_name, category_factors
from haina.data_spark.text import detect_kind, sentences, tokens
from tests.data_helpers import CODE_DOC, SPAM_DOC, ZH_SENTENCES, en_doc


@pytest.mark.parametrize("scheme", ["affine32", "legacy"])
@pytest.mark.parametrize("num_perm,seed", [(128, 1), (64, 42)])
def test_minhash_equals_datasketch(scheme: str, num_perm: int, seed: int) -> None:
    hasher = MinHasher.create(num_perm, seed, scheme)
    for text in [en_doc(0), "".join(ZH_SENTENCES), CODE_DOC, "two words"]:
        items = shingles(text, 5)
        reference = MinHash(num_perm=num_perm, seed=seed, scheme=scheme)
        reference.update_batch(items)
        assert np.array_equal(hasher.signature(items).astype(np.uint64), reference.hashvalues.astype(np.uint64))


def test_short_documents_do_not_collapse() -> None:
    hasher = MinHasher.create(128, 1)
    a, b = hasher.signature(shingles("hello world", 5)), hasher.signature(shingles("goodbye moon", 5))
    assert not np.array_equal(a, b)
    assert hasher.signature(shingles("!!! ...", 5)) is None  # no tokens: never indexed


def test_lsh_params_from_datasketch() -> None:
    assert lsh_params(0.8, 128, 0.5, 0.5) == _optimal_param(0.8, 128, 0.5, 0.5)
    bands, rows = lsh_params(0.7, 256, 0.5, 0.5)  # the defaults: banding tuned below the 0.8 threshold
    assert bands * rows <= 256
    assert candidate_probability(0.85, bands, rows) > 0.99 > 0.05 > candidate_probability(0.4, bands, rows)
    sig = MinHasher.create(128, 1).signature(shingles(en_doc(0), 5))
    assert band_keys(sig, bands, rows) == band_keys(sig.copy(), bands, rows)


def test_cjk_tokens_are_characters() -> None:
    assert tokens("数据 data 处理") == ["数", "据", "data", "处", "理"]
    assert detect_kind("".join(ZH_SENTENCES)) == "zh"
    assert detect_kind(CODE_DOC) == "code"
    assert detect_kind(en_doc(0)) == "en"
    assert sentences("这是一句。这是第二句！") == ["这是一句。", "这是第二句！"]


def test_rules_known_answers() -> None:
    cfg = HeuristicsConfig()
    cfg.en.min_words = 20
    assert document_reason(en_doc(0), "en", cfg) is None
    assert document_reason("".join(ZH_SENTENCES), "zh", cfg) is None  # English word rules would fail it
    assert document_reason(CODE_DOC, "code", cfg) is None
    assert document_reason(SPAM_DOC, "en", cfg).startswith("gopher")
    assert "too few words" in document_reason("Only a few words here.", "en", cfg)
    assert document_reason("".join(ZH_SENTENCES), "en", cfg) is not None
    text, dropped = clean_lines("Real text here.\nCopyright 2024. All rights reserved.\n版权所有 示例", "en", cfg)
    assert (text, dropped) == ("Real text here.", 2)


def test_line_units_rebuild_exactly() -> None:
    text = "para one\nline two\n\n  \npara two\n\npara three"
    units, _ = split_units(text, "paragraph")
    assert units == ["para one\nline two", "para two", "para three"]
    assert rebuild(text, "paragraph", set()) == text
    assert rebuild(text, "paragraph", {1}) == "para one\nline two\n\n  \npara three"
    assert rebuild(text, "line", {0}) == "line two\n\n  \npara two\n\npara three"


def test_category_factors_hit_targets() -> None:
    stats = {"en": (100.0, 100.0), "zh": (50.0, 50.0), "code": (50.0, 50.0)}
    factors = category_factors(stats, {"en": 0.25, "zh": 0.25})
    mass = {c: factors[c] * w for c, (_, w) in stats.items()}
    total = sum(mass.values())
    assert mass["en"] / total == pytest.approx(0.25)
    assert mass["zh"] / total == pytest.approx(0.25)
    assert mass["code"] / total == pytest.approx(0.5)
    assert bucket_name(0.3, [0.5, 1, 2]) == "b0" and bucket_name(1.5, [0.5, 1, 2]) == "b2"


def test_config_errors_are_one_line(tmp_path) -> None:
    with pytest.raises(ConfigError, match="near_dedup.threshold"):
        load_prepare_config(None, ["near_dedup.threshold=1.5"])
    with pytest.raises(ConfigError, match=r"^heuristics.nope: unknown key; allowed: code, doc_blocklist, en, "):
        load_prepare_config(None, ["heuristics.nope=1"])
    with pytest.raises(ConfigError, match=r"^category.rules.0.bad: unknown key; allowed: keywords, kinds, name"):
        load_prepare_config(None, ["category.rules=[{name: a, bad: 1}]"])
    with pytest.raises(ConfigError, match="missing.yaml: no such config file"):
        load_prepare_config(tmp_path / "missing.yaml")
    cfg = load_prepare_config(None, ["safety.blocklist=[x, y]", "category.targets={en: 0.5}"])
    assert cfg.safety.blocklist == ["x", "y"] and cfg.category.targets == {"en": 0.5}
