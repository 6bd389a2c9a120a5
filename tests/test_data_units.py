"""Pure-Python parts of the data job: MinHash vs datasketch, LSH parameters, rules, weights."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

import numpy as np
import pytest
from datasketch import MinHash, MinHashLSH
from datasketch.lsh import _optimal_param

from haina.core.errors import ConfigError
from haina.data_spark.config import HeuristicsConfig, load_prepare_config
from haina.data_spark.minhash import MinHasher, band_keys, candidate_probability, lsh_params, shingles
from haina.data_spark.rules import clean_lines, document_reason, gram_shares
from haina.data_spark.stages.line_dedup import rebuild, split_units, unit_tokens
from haina.data_spark.stages.weighting import bucket_name, category_factors
from haina.data_spark.text import (
    _CJK,
    _NOT_ALNUM_OR_SPACE,
    _TOKEN,
    _WORD,
    TokenTable,
    approx_tokens,
    cjk_fraction,
    detect_kind,
    judged_sentences,
    normalize,
    normalize_lines,
    normalize_many,
    sentences,
    sentences_by_line,
    tokens,
    words,
    words_with_letters,
)
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


_M64 = (1 << 64) - 1


def _mix64_by_hand(x: int) -> int:
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & _M64
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & _M64
    return x ^ (x >> 33)


def _key_by_hand(values: list[int], band: int) -> int:
    """A band's key as minhash.band_key_matrix documents it, in Python ints: the state starts from
    mix64(seed + band * golden), each of the band's uint32 rows is folded in as mix64(state ^ row), and the
    64 bits are read as a signed int64."""
    state = _mix64_by_hand((0x243F6A8885A308D3 + band * 0x9E3779B97F4A7C15) & _M64)
    for value in values:
        state = _mix64_by_hand(state ^ value)
    return state - (1 << 64) if state >= 1 << 63 else state


def test_band_keys_match_their_definition() -> None:
    """Band i covers datasketch's hash range i (rows i*r .. (i+1)*r); its key is a hash of exactly those rows."""
    bands, rows = 4, 3
    lsh = MinHashLSH(num_perm=bands * rows, params=(bands, rows))
    assert lsh.hashranges == [(0, 3), (3, 6), (6, 9), (9, 12)]
    values = [7, 1, 2**32 - 1, 0, 5, 9, 123456789, 42, 3, 8, 8, 8]
    keys = band_keys(np.array(values, dtype=np.uint32), bands, rows)
    assert keys == [_key_by_hand(values[start:end], band) for band, (start, end) in enumerate(lsh.hashranges)]
    assert all(-(2**63) <= k < 2**63 for k in keys)
    # the same rows in two bands give two keys (the band is part of the key, as datasketch keeps a table per band)
    same = band_keys(np.array([4, 5, 6] * bands, dtype=np.uint32), bands, rows)
    assert same == [_key_by_hand([4, 5, 6], band) for band in range(bands)] and len(set(same)) == bands
    # rows beyond bands * rows are in no band
    longer = band_keys(np.array([*values, 99, 98], dtype=np.uint32), bands, rows)
    assert longer == keys


def test_one_shared_band_collides_in_that_band_only() -> None:
    bands, rows = 5, 4
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**32, size=bands * rows, dtype=np.uint64).astype(np.uint32)
    b = a + np.uint32(1)  # every row differs ...
    b[2 * rows : 3 * rows] = a[2 * rows : 3 * rows]  # ... except band 2's
    keys_a, keys_b = band_keys(a, bands, rows), band_keys(b, bands, rows)
    assert [i for i in range(bands) if keys_a[i] == keys_b[i]] == [2]
    # datasketch's index agrees: b is a candidate of a (one shared band), a signature sharing none is not
    lsh = MinHashLSH(num_perm=bands * rows, params=(bands, rows))
    lsh.insert("a", MinHash(num_perm=bands * rows, hashvalues=a, scheme="affine32"))
    assert lsh.query(MinHash(num_perm=bands * rows, hashvalues=b, scheme="affine32")) == ["a"]
    assert lsh.query(MinHash(num_perm=bands * rows, hashvalues=a + np.uint32(1), scheme="affine32")) == []
    # one row changed in one band moves that band's key only
    c = a.copy()
    c[3 * rows + 1] ^= np.uint32(1)
    keys_c = band_keys(c, bands, rows)
    assert [i for i in range(bands) if keys_a[i] != keys_c[i]] == [3]
    # on real documents' signatures (the defaults' banding): keys agree exactly where the band's rows do
    bands, rows = lsh_params(0.7, 256, 0.5, 0.5)
    hasher = MinHasher.create(256, 1)
    sig, other = hasher.signature(shingles(en_doc(0), 5)), hasher.signature(shingles(en_doc(6), 5))
    mixed = other.copy()
    mixed[rows : 2 * rows] = sig[rows : 2 * rows]
    same_rows = [i for i in range(bands) if np.array_equal(sig[i * rows : (i + 1) * rows], mixed[i * rows : (i + 1) * rows])]
    same_keys = [i for i, (x, y) in enumerate(zip(band_keys(sig, bands, rows), band_keys(mixed, bands, rows), strict=True))
                 if x == y]
    assert 1 in same_rows and len(same_rows) < bands and same_keys == same_rows


def test_cjk_tokens_are_characters() -> None:
    assert tokens("数据 data 处理") == ["数", "据", "data", "处", "理"]
    assert detect_kind("".join(ZH_SENTENCES)) == "zh"
    assert detect_kind(CODE_DOC) == "code"
    assert detect_kind(en_doc(0)) == "en"
    assert sentences("这是一句。这是第二句！") == ["这是一句。", "这是第二句！"]


def test_text_fast_paths_equal_the_general_rules() -> None:
    """The ASCII shortcuts (normalize's table, the tokens, words and symbols by translation, the CJK share)
    give what the general rules give, on every ASCII character and on mixed scripts."""
    rng = np.random.default_rng(1)
    every_ascii = "".join(map(chr, range(128)))
    mixed = every_ascii + "İıßﬁ①²½ÅΣσς数据。！，・゠\u3000\u200b\U0001F600’\x85\xa0"
    texts = [every_ascii, en_doc(0), CODE_DOC, SPAM_DOC, "".join(ZH_SENTENCES)]
    apostrophes = "aZ9'' '_-.\t’数"  # words: apostrophes inside, around, doubled, at the ends
    texts += ["".join(rng.choice(list(pool), size=int(rng.integers(0, 60))))
              for pool in (every_ascii, mixed, apostrophes, apostrophes[:-2]) for _ in range(500)]
    symbol = re.compile(r"[^\w\s]")
    for text in texts:
        general = " ".join(_NOT_ALNUM_OR_SPACE.sub(" ", unicodedata.normalize("NFKC", text).lower()).split())
        assert normalize(text) == general, repr(text)
        assert normalize_lines(text) == [normalize(line) for line in text.split("\n")], repr(text)
        assert approx_tokens(text) == len(_TOKEN.findall(text)) + len(symbol.findall(text)), repr(text)
        assert tokens(text) == _TOKEN.findall(text.lower()), repr(text)
        assert words(text) == _WORD.findall(_CJK.sub(" ", text)), repr(text)
        split = text.split()
        assert words_with_letters(text) == (len(split), sum(any(map(str.isalpha, w)) for w in split)), repr(text)
        letters = sum(map(str.isalpha, text))
        assert cjk_fraction(text) == (len(_CJK.findall(text)) / letters if letters else 0.0), repr(text)
    assert normalize(every_ascii) == "0123456789 abcdefghijklmnopqrstuvwxyz abcdefghijklmnopqrstuvwxyz"
    assert normalize_many(texts + [None, "", "..."]) == [normalize(text) for text in texts] + [None, "", ""]
    # the batch's token table (Arrow's cut of the translated bytes) holds each text's tokens, in order
    batch = texts + [None, "", " \t ", "...", "数"]
    table = TokenTable.of_texts(batch)
    assert table.rows == len(batch) and list(table.lengths) == [len(tokens(text)) if text else 0 for text in batch]
    assert [table.distinct[t] for t in table.token] == [t for text in batch if text for t in tokens(text)]
    assert list(table.row) == [i for i, text in enumerate(batch) if text for _ in tokens(text)]
    # sentences_by_line and judged_sentences cut the whole text in one pass: the sentences of each line, as
    # sentences() cuts them
    breaks = list("aZ9 .!?;。！？；\n\n\r\t\x0b\x0c\x85\u2028\u3000")
    for text in texts[:200] + ["".join(rng.choice(breaks, size=int(rng.integers(0, 40)))) for _ in range(3000)]:
        by_line = [sentences(line) for line in text.split("\n")]
        assert sentences_by_line(text) == by_line, repr(text)
        for least in (0, 3):
            assert judged_sentences(text, least) == [p for line in by_line for p in line if len(p.strip()) >= least]


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


def _shares_counting_every_gram(units: list[str], n: int) -> tuple[float, float]:
    """The top and duplicate n-gram shares by counting every n-gram of the text: the reference."""
    total = sum(map(len, units))
    if len(units) < n or not total:
        return 0.0, 0.0
    grams = [tuple(units[i : i + n]) for i in range(len(units) - n + 1)]
    counts = Counter(grams)
    gram, count = counts.most_common(1)[0]
    covered, seen = [False] * len(units), set()
    for i, g in enumerate(grams):
        if counts[g] > 1 and g in seen:
            covered[i : i + n] = [True] * n
        seen.add(g)
    top = count * sum(map(len, gram)) / total if count > 1 else 0.0
    return top, sum(len(u) for u, c in zip(units, covered, strict=True) if c) / total


def test_ngram_shares_equal_counting_every_gram() -> None:
    """The n-grams of a whole batch counted in numpy, each size only where the sizes before it found a
    repeat, give every list the shares of counting all its n-grams on its own, for any set of sizes (Chinese
    scales them, a config may leave gaps), with lists of every length side by side, empty ones included."""
    rng = np.random.default_rng(0)
    vocab = ["a", "bb", "ccc", "the", "of", "data", "数", "据"]
    texts = [list(rng.choice(vocab[: int(rng.integers(2, 9))], size=int(rng.integers(0, 80)))) for _ in range(300)]
    texts += [tokens(en_doc(0)), tokens(SPAM_DOC), tokens("".join(ZH_SENTENCES)), tokens(en_doc(1) * 3), []]
    orders = [[2, 3, 4, 5, 6, 7, 8, 9, 10], [3, 4, 6, 8, 9, 10, 12, 14, 15], [6, 3, 5, 1, 12, 2]]
    repeats = 0
    for order in orders:
        top, dup = gram_shares(TokenTable(texts), order[::2], order[1::2] + order[:1])
        for row, units in enumerate(texts):
            for n in order:
                expected = _shares_counting_every_gram(units, n)
                if n in order[::2]:
                    assert top[n][row] == expected[0], (units, order, n)
                if n in order[1::2] + order[:1]:
                    assert dup[n][row] == expected[1], (units, order, n)
                    repeats += dup[n][row] > 0
    assert repeats > 500  # the texts do repeat
    empty_top, empty_dup = gram_shares(TokenTable([]), [2], [5])
    assert len(empty_top[2]) == len(empty_dup[5]) == 0


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


def _one_line(func, *args, match: str) -> str:
    """The ConfigError ``func`` raises: one line (no newline anywhere, not even at the end), matching ``match``."""
    with pytest.raises(ConfigError) as info:
        func(*args)
    message = str(info.value)
    assert message.strip() and "\n" not in message and "\r" not in message, repr(message)
    assert re.search(match, message), (match, message)
    return message


def test_config_errors_are_one_line(tmp_path) -> None:
    _one_line(load_prepare_config, None, ["near_dedup.threshold=1.5"], match=r"^near_dedup\.threshold: ")
    _one_line(load_prepare_config, None, ["heuristics.nope=1"],
              match=r"^heuristics.nope: unknown key; allowed: code, doc_blocklist, en, ")
    _one_line(load_prepare_config, None, ["category.rules=[{name: a, bad: 1}]"],
              match=r"^category.rules.0.bad: unknown key; allowed: keywords, kinds, name")
    _one_line(load_prepare_config, tmp_path / "missing.yaml", match="missing.yaml: no such config file")
    cfg = load_prepare_config(None, ["safety.blocklist=[x, y]", "category.targets={en: 0.5}"])
    assert cfg.safety.blocklist == ["x", "y"] and cfg.category.targets == {"en": 0.5}


def test_batch_signatures_equal_one_text_at_a_time() -> None:
    """The batch path (sha1 shingle hash): every text's signature is datasketch's, and a text cut by a
    permutation block's edge gets the minimum over both halves."""
    from haina.data_spark import minhash

    hasher = MinHasher.create(64, 3)
    texts = [en_doc(0), "", "".join(ZH_SENTENCES), "two words", CODE_DOC * 40, "!!!", en_doc(6)]
    hv, offsets = minhash.sha1_shingle_hashes(texts, 5, hasher)
    for chunk in (7, 1 << 14):
        saved, minhash._CHUNK = minhash._CHUNK, chunk
        try:
            sigs = minhash.batch_signatures(hasher, hv, offsets)
        finally:
            minhash._CHUNK = saved
        for i, text in enumerate(texts):
            items = shingles(text, 5)
            if not items:
                assert offsets[i] == offsets[i + 1]
                continue
            reference = MinHash(num_perm=64, seed=3)
            reference.update_batch(items)
            assert np.array_equal(sigs[i], reference.hashvalues.astype(np.uint32)), (chunk, i)


def test_fast_shingle_hashes_one_per_distinct_shingle() -> None:
    from haina.data_spark.minhash import fast_shingle_hashes

    texts = [en_doc(0), en_doc(0), "a b c", "a b", "", "!!! ...", "x " * 30, "".join(ZH_SENTENCES)]
    hv, offsets = fast_shingle_hashes(texts, 5)
    per = [hv[offsets[i] : offsets[i + 1]] for i in range(len(texts))]
    assert [len(h) for h in per] == [len(set(shingles(t, 5))) for t in texts]
    assert np.array_equal(per[0], per[1]) and not np.array_equal(per[2], per[3])  # same text, same hashes
    assert len(set(per[0].tolist()) & set(fast_shingle_hashes([en_doc(6)], 5)[0].tolist())) == 0


def test_packed_signatures_give_the_set_jaccard() -> None:
    """The packed columns read back as the signer's arrays, texts without tokens are null, and a pair's
    similarity is the Jaccard of the shingle sets (exact) or the share of equal signature values."""
    from haina.data_spark.ingest_keys import Signer, unpacked
    from haina.data_spark.stages.near_dedup import pair_similarities

    cfg = load_prepare_config(None, ["near_dedup.num_perm=64"]).near_dedup
    texts = [en_doc(0), en_doc(0) + " And one more sentence at the end.", "!!!", en_doc(3), "".join(ZH_SENTENCES)]
    sig, bands, hv = Signer.create(cfg).sign_batch([normalize(t) for t in texts])
    assert sig[2].as_py() is None and bands[2].as_py() is None and hv[2].as_py() is None
    sets = [set(shingles(normalize(t), cfg.shingle_size)) for t in texts]
    pairs = [(0, 1), (0, 3), (1, 0), (4, 4), (3, 4)]
    a, b = [hv[i].as_py() for i, _ in pairs], [hv[j].as_py() for _, j in pairs]
    assert [len(unpacked(x)) for x in a] == [len(sets[i]) for i, _ in pairs]
    got = pair_similarities(a, b, cfg)
    assert got == [len(sets[i] & sets[j]) / len(sets[i] | sets[j]) for i, j in pairs]
    assert 0.5 < got[0] < 1 and got[3] == 1.0
    cfg.verify = "signature"
    a, b = [sig[i].as_py() for i, _ in pairs], [sig[j].as_py() for _, j in pairs]
    assert all(len(unpacked(x)) == 64 for x in a)
    assert pair_similarities(a, b, cfg) == [np.mean(unpacked(x) == unpacked(y)) for x, y in zip(a, b, strict=True)]


def test_normalize_and_counts_match_their_character_definitions() -> None:
    """The regex forms of normalize and approx_tokens agree with the per-character definitions."""
    import sys
    import unicodedata

    from haina.data_spark.text import _TOKEN, approx_tokens, normalize

    everything = "".join(chr(c) for c in range(0, sys.maxunicode + 1, 7) if not 0xD800 <= c <= 0xDFFF)
    slow = unicodedata.normalize("NFKC", everything).lower()
    slow = " ".join("".join(c if c.isalnum() or c.isspace() else " " for c in slow).split())
    assert normalize(everything) == slow
    for text in (everything[:5000], en_doc(0), CODE_DOC, "".join(ZH_SENTENCES)):
        symbols = sum(1 for c in text if not c.isspace() and not c.isalnum() and c != "_")
        assert approx_tokens(text) == len(_TOKEN.findall(text)) + symbols


def test_feature_rows_equal_featurize() -> None:
    from haina.data_spark.features import feature_rows, featurize
    from haina.data_spark.text import approx_tokens

    lines = [en_doc(0), "", "!!! $$$ BUY NOW http://x.example", "".join(ZH_SENTENCES), SPAM_DOC, "Ã© mojibake",
             "see www.example.org, a_b__c", "NASA's JPL (USA)...", "İSTANBUL, ǅemal -- ok", "x ++ y", "AB CD EFG",
             "ΟΔΟΣ", "ΑΒ ΟΔΟΣ", "...", "ΣΑ"]  # a final sigma before the next text, a text without tokens
    lines += lines[:3]  # repeats are featurised once and given to each
    # the punctuation, URL and shouting grams are read off the characters of the batch laid end to end:
    # none may run from one text into the next
    edges = ["a.", ".b", "", "ABC", "DEF", "AB", "C", "ww", "w.x", "http:", "//x", "-", "-", "ABC_DEF", "ABC1",
             "(ABC)", "éABC", "wwww.x", "https://www.x", "...!?", "::"]
    rng = np.random.default_rng(2)
    pool = list("ABCZab .,-:/!?_1É€http/wws") + [" www.", "http://", "https://", "ΟΔ"]
    fuzz = [["".join(rng.choice(pool, size=int(rng.integers(0, 12)))) for _ in range(int(rng.integers(1, 7)))]
            for _ in range(300)]
    for batch in (lines, [*lines, "a\x00b c"], ["", ""], ["one"], edges, *fuzz):
        for shape in (False, True):
            values, ids, starts, ntok = feature_rows(batch, 1 << 12, shape)
            for i, line in enumerate(batch):
                ref_ids, ref_values = featurize(line, 1 << 12, shape)
                assert np.array_equal(ids[starts[i] : starts[i + 1]], ref_ids), line
                assert np.allclose(values[starts[i] : starts[i + 1]], ref_values, rtol=1e-12, atol=0)
            assert ntok.tolist() == [approx_tokens(line) for line in batch]


def test_band_key_matrix_rows_are_band_keys() -> None:
    """The batch form gives each signature the keys band_keys gives it alone."""
    from haina.data_spark.minhash import band_key_matrix

    rng = np.random.default_rng(1)
    sigs = rng.integers(0, 2**32, size=(6, 256), dtype=np.uint64).astype(np.uint32)
    bands, rows = lsh_params(0.7, 256, 0.5, 0.5)
    keys = band_key_matrix(sigs, bands, rows)
    assert keys.shape == (6, bands) and keys.dtype == np.int64
    assert [row.tolist() for row in keys] == [band_keys(sig, bands, rows) for sig in sigs]


def test_label_components_smallest_id_per_component() -> None:
    from haina.data_spark.connected_components import label_components

    src = np.array([140, 7, 7, 7, 7, 500, 9, *range(100, 139)], dtype=np.int64)
    dst = np.array([139, 90, 3, 55, 12, 400, 9, *range(101, 140)], dtype=np.int64)  # (9, 9): a self-loop only
    ids, component = label_components(src, dst)
    labels = dict(zip(ids.tolist(), component.tolist(), strict=True))
    assert ids.tolist() == sorted(labels) and 9 not in labels
    assert all(labels[n] == 100 for n in range(100, 141))
    assert all(labels[n] == 3 for n in (7, 90, 3, 55, 12)) and labels[400] == labels[500] == 400
    empty = label_components(np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert [len(a) for a in empty] == [0, 0]


def test_kmeans_centres_are_deterministic_and_find_separated_clusters() -> None:
    from haina.data_spark.stages.embedding import fit_centers, nearest

    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(4), 50)
    x = (rng.standard_normal((200, 8)) * 0.05 + np.eye(8)[truth] * 3).astype(np.float32)
    centers = fit_centers(x, 4, seed=7, max_iter=20)
    assert np.array_equal(centers, fit_centers(x, 4, seed=7, max_iter=20))
    labels = nearest(x, centers)
    assert labels.dtype == np.int32 and len(set(labels.tolist())) == 4
    assert all(len(set(labels[truth == c].tolist())) == 1 for c in range(4))  # one cluster per blob
    assert len(fit_centers(np.ones((5, 3)), 3, seed=1, max_iter=5)) == 1  # one distinct point, one centre


def test_cluster_sums_add_each_clusters_rows_in_order() -> None:
    """k-means' sums equal adding each row to its cluster's sum one after another (``np.add.at``), bit for bit:
    the fitted centres, and so every document's cluster, do not change with the way they are summed."""
    from haina.data_spark.stages.embedding import cluster_sums

    rng = np.random.default_rng(3)
    for _ in range(20):
        n, k = int(rng.integers(1, 3000)), int(rng.integers(1, 12))
        x = rng.standard_normal((n, 5)) * 10.0 ** rng.uniform(-4, 4, size=(n, 1))  # magnitudes that round apart
        labels = rng.integers(0, k, n)
        labels[labels == k - 1] = 0  # an empty cluster
        expected = np.zeros((k, 5))
        np.add.at(expected, labels, x)
        assert np.array_equal(cluster_sums(x, labels, np.bincount(labels, minlength=k)), expected)


def _two_passes(texts: list[str], min_chars: int) -> list[tuple[str, int, int]]:
    """Line dedup as two passes (paragraphs, then lines on what the first left), in plain Python."""
    from haina.data_spark.stages.line_dedup import unit_keys

    counts: list[list[int]] = [[] for _ in texts]
    for unit in ("paragraph", "line"):
        first: dict[bytes, tuple[int, int]] = {}
        keyed = [unit_keys(text, unit, min_chars) for text in texts]
        for row, found in enumerate(keyed):
            for k in found:
                first.setdefault(k["key"], (row, k["pos"]))
        for row, found in enumerate(keyed):
            drop = {k["pos"] for k in found if first[k["key"]] != (row, k["pos"])}
            counts[row].append(len(drop))
            edited = rebuild(texts[row], unit, drop) if drop else texts[row]
            assert unit_tokens(texts[row], unit, drop) == approx_tokens(texts[row]) - approx_tokens(edited)
            texts[row] = edited
    return [(text, p, line) for text, (p, line) in zip(texts, counts, strict=True)]


def _one_pass(texts: list[str], min_chars: int) -> list[tuple[str, int, int]]:
    """Line dedup as line_dedup._both does it, in plain Python: every unit keyed on the texts as they came,
    the repeated paragraphs found, then the repeats among the lines of the paragraphs that stay."""
    from haina.data_spark.stages.line_dedup import both_unit_keys, drop_both

    keyed = [both_unit_keys(text, min_chars) for text in texts]

    def repeats(units: list[tuple[int, dict]]) -> set[tuple[int, int]]:
        first: dict[bytes, tuple[int, int]] = {}
        for row, k in units:
            first.setdefault(k["key"], (row, k["pos"]))
        return {(row, k["pos"]) for row, k in units if first[k["key"]] != (row, k["pos"])}

    gone = repeats([(row, k) for row, found in enumerate(keyed) for k in found if k["unit"] == 0])
    lines = repeats([(row, k) for row, found in enumerate(keyed) for k in found
                     if k["unit"] == 1 and (row, k["para"]) not in gone])
    out = []
    for row, text in enumerate(texts):
        new, paragraphs, removed, tokens = drop_both(text, {p for r, p in gone if r == row},
                                                     {j for r, j in lines if r == row}, min_chars)
        assert tokens == approx_tokens(text) - approx_tokens(new)  # the count the edit pass takes off
        out.append((new, paragraphs, removed))
    return out


def test_one_pass_line_dedup_equals_two_passes() -> None:
    """line_dedup's one pass equals the paragraph pass then the line pass, on random texts built from a few
    repeated lines, paragraphs wrapped differently (equal once normalised, their lines not) and every kind
    of separator."""
    rng = np.random.default_rng(0)
    lines = [f"line {i} with enough words to count for dedup" for i in range(8)] + ["short", "", "  ", "\t"]
    lines += ["第二行：足够长的中文句子，用来去重。", "symbols -- #$% & (more) ... enough!"]
    seps = ["\n\n", "\n \n", "\n\t\n\n", "\n\n\n"]
    for trial in range(400):
        texts = []
        for _ in range(int(rng.integers(1, 6))):
            paragraphs = []
            for _ in range(int(rng.integers(1, 5))):
                chosen = rng.choice(lines, size=int(rng.integers(1, 4))).tolist()
                joints = rng.choice(["\n", " "], size=len(chosen) - 1).tolist()  # the same words, wrapped or not
                paragraphs.append(chosen[0] + "".join(j + line for j, line in zip(joints, chosen[1:], strict=True)))
            text = paragraphs[0]
            for paragraph in paragraphs[1:]:
                text += str(rng.choice(seps)) + paragraph
            texts.append(str(rng.choice(["", "\n", "\n\n"])) + text + str(rng.choice(["", "\n", "\n \n"])))
        assert _one_pass(texts, 20) == _two_passes(list(texts), 20), (trial, texts)


def test_both_unit_keys_equal_each_units_own_keys() -> None:
    """The batch keying normalises each line once and builds a paragraph's key from its lines' normal
    forms; on text where NFKC, lower-casing or collapsing could act across a newline (final sigma,
    combining marks and Hangul jamo starting a line, ligatures, fullwidth forms, dotted capital I, blank
    lines of spaces and tabs), it gives every paragraph and line the key unit_keys gives it alone."""
    from haina.data_spark.stages.line_dedup import _line_owners, both_key_lists, unit_keys

    texts = [
        "ΑΣ\nΒ x\n\nΟΔΟΣ' \n ΣΑ\n",
        "e\u0301\n\u0301a\n\n\n\u1100\n\u1161 x",
        "ＡＢＣ１２\n\nﬁne ligature\n \t\nİstanbul\nSS ß",
        "a\n\n", "\n\n\nx\n", "", en_doc(3), CODE_DOC, "\n\n".join(ZH_SENTENCES),
    ]
    for min_chars in (1, 20):
        got = both_key_lists(texts, min_chars).to_pylist()
        for text, units in zip(texts, got, strict=True):
            owner = _line_owners(text)
            expected = ([{"unit": 0, "pos": k["pos"], "para": k["pos"], "key": k["key"]}
                         for k in unit_keys(text, "paragraph", min_chars)]
                        + [{"unit": 1, "pos": k["pos"], "para": owner[k["pos"]], "key": k["key"]}
                           for k in unit_keys(text, "line", min_chars)])
            assert units == expected, text


def test_local_jvm_options_quick_jit_and_class_archive(tmp_path, monkeypatch) -> None:
    """C1 only for a local job on little input; a large one, a cluster, an unknown size and the user's own
    choice of tier keep theirs; the user's other JVM options stay. A local JVM maps this machine's class
    archive once one exists, unless the user's options choose class sharing themselves; the archive's name
    follows the Java and the Spark installation."""
    import gzip

    from haina.data_spark import class_archive
    from haina.data_spark.session import QUICK_JIT, SHORT_JOB_BYTES, input_bytes, java_options

    monkeypatch.setenv("HAINA_CACHE_DIR", str(tmp_path / "cache"))
    key = "spark.driver.extraJavaOptions"
    assert java_options("local[2]", {}, 10) == {key: QUICK_JIT}
    assert java_options("local[*]", {key: "-Xss4m"}, SHORT_JOB_BYTES) == {key: f"-Xss4m {QUICK_JIT}"}
    assert java_options("local[2]", {}, SHORT_JOB_BYTES + 1) == {}
    assert java_options("local[2]", {}, None) == {}
    assert java_options("spark://host:7077", {}, 10) == {}
    assert java_options(None, {}, 10) == {}  # submitted: the JVM runs already
    assert java_options("local[2]", {key: "-XX:TieredStopAtLevel=4"}, 10) == {key: "-XX:TieredStopAtLevel=4"}
    archive = class_archive.archive_path()
    assert archive is not None and archive.parent == tmp_path / "cache"
    archive.parent.mkdir()
    archive.write_bytes(b"classes")
    mapped = f"-XX:SharedArchiveFile={archive} {class_archive.QUIET}"
    assert java_options("local[2]", {}, 10) == {key: f"{mapped} {QUICK_JIT}"}
    assert java_options("local[2]", {key: "-Xss4m"}, None) == {key: f"-Xss4m {mapped}"}
    assert java_options("local[2]", {key: "-Xshare:off"}, None) == {key: "-Xshare:off"}
    assert java_options("spark://host:7077", {}, 10) == {}
    java = tmp_path / "jdk" / "bin" / "java"
    java.parent.mkdir(parents=True)
    java.write_bytes(b"another java")
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "jdk"))
    assert class_archive.archive_path() not in (None, archive)
    assert java_options("local[2]", {}, None) == {}
    plain = tmp_path / "a.jsonl"
    plain.write_bytes(b"x" * 1000)
    folder = tmp_path / "parquet"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "part-0.parquet").write_bytes(b"y" * 300)
    packed = tmp_path / "b.jsonl.gz"
    packed.write_bytes(gzip.compress(b"z" * 5000))
    assert input_bytes([plain, folder, packed]) == 1000 + 300 + 4 * packed.stat().st_size


def test_data_job_modules_do_not_import_torch() -> None:
    """Every Spark Python worker imports the stages it runs: torch would cost each 0.9 s and some 300 MB."""
    import subprocess
    import sys

    modules = ["haina.data_spark.prepare", "haina.data_spark.pipeline", "haina.data_spark.ingest"] + [
        f"haina.data_spark.stages.{name}" for name in
        ("exact_dedup", "heuristics", "quality", "line_dedup", "near_dedup", "embedding", "safety", "category",
         "weighting")]
    code = f"import sys; import {', '.join(modules)}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout[:200]
