"""Small corpora with known answers and a shared local Spark session for the data-job tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_helpers import run_cli_batch

EN_SENTENCES = [
    "The harbour town grew quickly after the new railway line reached it in the spring of 1871.",
    "Merchants built warehouses along the quay and shipped wool, grain and timber to distant ports.",
    "Most families lived in narrow stone houses that had been divided into several small rooms.",
    "A school opened near the church, and within ten years nearly every child could read.",
    "The river silted up slowly, so larger ships had to anchor outside the bar and wait for the tide.",
    "Local historians still argue about why the market hall was moved to the top of the hill.",
    "Beekeeping is one of the oldest forms of farming, older perhaps than the plough itself.",
    "A healthy colony can gather enough nectar in a good summer to fill several wooden boxes.",
    "Worker bees communicate the direction of flowers through a short dance on the comb.",
    "In cold winters the insects cluster tightly together and shiver to keep the queen warm.",
    "Many gardeners now plant lavender, clover and thyme to feed the bees that visit them.",
    "Careful keepers inspect each hive every week and record what they find in a notebook.",
    "The observatory sits on a dry plateau where the air is thin and the nights are clear.",
    "Astronomers there measure the light of distant stars to learn what they are made of.",
    "A large mirror collects faint light, and sensitive cameras record it over many hours.",
    "Students from several countries spend a month at the station learning how to use it.",
    "Clouds rarely form above the plateau, which is why the site was chosen in the first place.",
    "The data are shared freely, so scientists anywhere can test their own ideas with them.",
    "Bread has been baked in almost every culture, from flat loaves to tall sourdough rounds.",
    "Yeast feeds on the sugars in flour and releases gas that makes the dough rise.",
    "A longer, cooler rise gives the crumb more flavour and a more open texture.",
    "Bakers in the old quarter still light their ovens before dawn to be ready for the market.",
    "Some recipes call for rye or barley, which give the loaf a darker colour and a denser bite.",
    "The finished bread should sound hollow when you tap the bottom of the crust.",
]
EN_EXTRA = [
    "Mountain villages often depend on a single road that can be closed by snow for weeks.",
    "Doctors travel between them on foot during the winter, carrying medicine in heavy packs.",
    "The council recently voted to build a small clinic that will stay open all year.",
    "Children from the highest farms board in the valley during the week and go home on Fridays.",
    "Visitors come in summer to walk the ridges and buy cheese made from the milk of local goats.",
    "Older residents remember when the post arrived by mule once a fortnight.",
]
ZH_SENTENCES = [
    "这座小城位于两条河流交汇的地方，自古以来就是重要的商业中心。",
    "城里的老街两旁都是木结构的房屋，许多店铺已经经营了上百年。",
    "每到春节，附近村庄的人们都会来到这里赶集，购买年货。",
    "近年来，当地政府修缮了古城墙，并在河边修建了步行道。",
    "茶叶种植是山区农民的重要收入来源，这里出产的绿茶远近闻名。",
    "采茶季节从清明前开始，茶农们天不亮就上山采摘嫩芽。",
    "新鲜的茶叶需要经过摊晾、杀青、揉捻和烘干等多道工序。",
    "老师傅凭借多年经验，能够准确判断每一锅茶的火候。",
]
CODE_DOC = '''def moving_average(values, window):
    """Mean of each run of `window` consecutive values."""
    if window <= 0:
        raise ValueError("window must be positive")
    total = sum(values[:window])
    out = [total / window]
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        out.append(total / window)
    return out


class Counter:
    def __init__(self):
        self.counts = {}

    def add(self, key):
        self.counts[key] = self.counts.get(key, 0) + 1
        return self.counts[key]
'''
SPAM_DOC = "\n".join(["BUY CHEAP PILLS NOW!!! best price click here http://spam.example/x"] * 12)
SPAM_LINE = "Click here now!!! Win a FREE phone, limited offer, buy now!!!"
UNSAFE_LINE = "I know where you live and I will hurt your family with a knife tonight."


def en_doc(start: int, count: int = 6, sentences: list[str] = EN_SENTENCES) -> str:
    return " ".join(sentences[start : start + count])


def known_corpus() -> list[dict]:
    """Documents whose fate is known: see the ``expect`` field (kept, or the stage that removes it)."""
    docs = [
        {"id": "en-a", "text": en_doc(0), "source": "web", "expect": "kept"},
        {"id": "en-b", "text": en_doc(6), "source": "web", "expect": "kept"},
        {"id": "en-c", "text": en_doc(12), "source": "books", "expect": "kept"},
        {"id": "en-d", "text": en_doc(18) + "\n" + SPAM_LINE, "source": "web", "expect": "kept"},
        {"id": "zh-a", "text": "".join(ZH_SENTENCES[:4]), "source": "news", "expect": "kept"},
        {"id": "zh-b", "text": "".join(ZH_SENTENCES[4:]), "source": "news", "expect": "kept"},
        {"id": "code-a", "text": CODE_DOC, "source": "code", "expect": "kept"},
        {"id": "en-a-copy", "text": "  " + en_doc(0).upper() + " ", "source": "web", "expect": "exact_dedup"},
        {"id": "spam", "text": SPAM_DOC, "source": "web", "expect": "heuristics"},
        {"id": "en-b-near", "text": en_doc(6).replace("oldest", "most ancient"), "source": "web",
         "expect": "near_dedup"},
        {"id": "unsafe", "text": " ".join(EN_EXTRA[:3]) + "\n" + UNSAFE_LINE + "\n" + " ".join(EN_EXTRA[3:]),
         "source": "forum", "expect": "safety"},
    ]
    return docs


def write_jsonl(path: Path, records: list[dict], extra_lines: list[bytes] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for record in records:
            f.write(json.dumps({k: v for k, v in record.items() if k != "expect"}, ensure_ascii=False).encode() + b"\n")
        for line in extra_lines:
            f.write(line + b"\n")
    return path


BAD_LINES = [
    b'{"text": "broken json',  # malformed JSON
    b'{"text": "bad bytes \xff\xfe here"}',  # invalid UTF-8
    b'{"id": "no-text"}',  # missing field
    b'{"text": "   "}',  # empty document
    b'{"text": 42}',  # wrong type
    b'[1, 2, 3]',  # not an object
    json.dumps({"text": "x" * 5000}).encode(),  # huge with input.max_chars=4000
]

# Fast settings for tests: small classifiers, few k-means iterations, the demo's unsafe marker.
TEST_OVERRIDES = [
    "input.max_chars=4000",
    "heuristics.en.min_words=20",
    "quality.model.max_iter=30",
    "safety.model.max_iter=30",
    "embedding.k=3",
    "embedding.max_iter=5",
    "tokenize.partitions=2",
]


# Spark settings of the test runs that cost time on corpora of a few documents and change nothing in the
# output. Adaptive query execution re-plans after every shuffle (one Spark job each), which costs more than
# the work; C1-only JIT spares a short-lived JVM the optimising compiler's threads, which compete with the
# work for two cores. The job's output must not depend on either: the spark-submit run of ``cli_runs`` keeps
# Spark's adaptive execution, and test_data_cli compares its output with the CLI run's (with these
# settings), which test_data_pipeline and test_reliability_data compare with the session's.
QUICK_JVM = "-XX:TieredStopAtLevel=1"
QUICK_SPARK = {"spark.sql.adaptive.enabled": "false", "spark.driver.extraJavaOptions": QUICK_JVM}


@pytest.fixture(scope="session")
def spark():
    """One local[2] session for every data test (small shuffles, no UI, ``QUICK_SPARK``); Spark stops it
    at exit."""
    from haina.data_spark.config import SparkConfig
    from haina.data_spark.session import get_session

    cfg = SparkConfig(shuffle_partitions=2, conf={"spark.ui.enabled": "false", **QUICK_SPARK})
    return get_session(cfg, "local[2]")


def tiny_tokenizer(folder: Path) -> Path:
    """A small SentencePiece BPE model trained on the known corpus (seconds, no downloads)."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(r["text"] for r in known_corpus()) * 3, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tok"), vocab_size=700, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, hard_vocab_limit=False, minloglevel=2,
    )
    return folder / "tok.model"


# --------------------------------------------------------------------- the CLI and spark-submit runs

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = [*TEST_OVERRIDES, "spark.shuffle_partitions=2", "safety.blocklist=['[unsafe-demo]']"]
# one plain JSON-lines event log per application (Spark 4 rolls and compresses it by default)
EVENT_LOG = ["spark.eventLog.enabled=true", "spark.eventLog.rolling.enabled=false", "spark.eventLog.compress=false"]

def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYSPARK_GATEWAY")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this venv's python, spark-submit
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def cli_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The README's data commands run as a user runs them (see test_data_cli), once per session: `haina data
    prepare` then `data tokenize --prepared` through the CLI in a fresh interpreter (`--master local[1]`), and
    `launchers/spark_submit.sh prepare` beside it."""
    root = tmp_path_factory.mktemp("cli")
    inputs = [str(write_jsonl(root / "a.jsonl", known_corpus()[:6])),
              str(write_jsonl(root / "b.jsonl", known_corpus()[6:], BAD_LINES))]
    model = tiny_tokenizer(root / "tok")
    (root / "tmp").mkdir()
    (root / "events").mkdir()
    submit_log = open(root / "submit.log", "w")  # noqa: SIM115  (closed below)
    submit = subprocess.Popen(
        [str(ROOT / "launchers" / "spark_submit.sh"), "prepare", "--input", *inputs, "--output",
         str(root / "submitted"), *OVERRIDES],
        cwd=root, stdout=submit_log, stderr=subprocess.STDOUT, text=True,
        env=_env(SPARK_MASTER="local[1]", TMPDIR=str(root / "tmp"),  # the launcher's wheel lands in TMPDIR
                 SPARK_ARGS=" ".join(f"--conf {c}" for c in EVENT_LOG) + f" --conf spark.eventLog.dir={(root / 'events').as_uri()}"
                 f" --conf spark.driver.extraJavaOptions={QUICK_JVM}"),
    )
    try:
        commands = {
            "prepare": ["data", "prepare", "--input", *inputs, "--output", str(root / "cli"), "--master", "local[1]",
                        *OVERRIDES, f"spark.conf={json.dumps(QUICK_SPARK)}"],
            "tokenize": ["data", "tokenize", "--prepared", str(root / "cli"), "--tokenizer", str(model),
                         "--master", "local[1]"],
        }
        cli = run_cli_batch(commands, env=_env(), cwd=root, timeout=1200)
        submit.wait(timeout=1200)
    finally:
        if submit.poll() is None:
            submit.kill()
        submit_log.close()
    return {"root": root, "model": model, "cli": cli, "submit_rc": submit.returncode,
            "submit_log": (root / "submit.log").read_text(errors="replace")}
