"""No single record, and no damaged compressed file, ends the data job: each becomes a quarantine row.

The parser and the gzip reader are tested directly (no Spark, milliseconds); one small Spark read checks
the line splitting, and one small end-to-end run checks report.json and the ``--max-quarantine-share`` stop.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from haina.data_spark.config import load_prepare_config
from haina.data_spark.gzip_lines import gzip_lines
from haina.data_spark.ingest import BadRecord, TooManyBadRecords, check_quarantine_share, parse_line
from tests.data_helpers import (
    TEST_OVERRIDES,
    known_corpus,
    spark,  # noqa: F401  (session fixture)
    write_jsonl,
)

CFG = load_prepare_config(None, TEST_OVERRIDES)

# (line, the exact quarantine reason)
BROKEN: list[tuple[bytes, str]] = [
    (b'{"text": "abc \\ud800 def"}', "invalid Unicode (lone surrogate U+D800 in field 'text' at character 4)"),
    (b'{"text": "fine", "source": "\\udfff"}', "invalid Unicode (lone surrogate U+DFFF in field 'source' at character 0)"),
    (b"[" * 200_000 + b"]" * 200_000, "JSON nested too deeply (past Python's recursion limit)"),
    (b'{"text": "ok", "n": ' + b"9" * 5000 + b"}", "number too large (an integer of more than 4300 digits)"),
    (b'{"text": ["a", "list"]}', "wrong field type ('text' is list, not a string)"),
    (b'{"text": "ok", "source": {"a": 1}}', "wrong field type ('source' is dict, not a string)"),
    (b'{"text": "ok", "url": 5}', "wrong field type ('url' is int, not a string)"),
    (b'{"text": "ok", "id": true}', "wrong field type ('id' is bool, not a string or a number)"),
    (b'{"text": "broken json', "malformed JSON (Unterminated string starting at column 10)"),
    (b'{"text": "a\rb"}', "malformed JSON (Invalid control character at column 12)"),  # raw CR inside a string
    (b'{"text": }', "malformed JSON (Expecting value at column 10)"),
    (b'{"text": "bad \xff bytes"}', "invalid UTF-8 (byte 14)"),
    (b'{"id": "no-text"}', "missing field 'text'"),
    (b"[1, 2, 3]", "not a JSON object (list)"),
    (b'{"text": "   "}', "empty document"),
    (json.dumps({"text": "x" * 5000}).encode(), "huge document (5000 > 4000 characters)"),
]


@pytest.mark.parametrize(("line", "reason"), BROKEN, ids=[r.partition(" (")[0] + f"-{i}" for i, (_, r) in enumerate(BROKEN)])
def test_every_broken_record_gets_its_full_reason(line: bytes, reason: str) -> None:
    with pytest.raises(BadRecord) as info:
        parse_line(line, CFG)
    assert str(info.value) == reason


def test_good_records_with_unusual_but_valid_content() -> None:
    assert parse_line('{"text": "a\u2028b\u2029c\x85d"}'.encode(), CFG)[3] == "a\u2028b\u2029c\x85d"
    assert parse_line(b'{"text": "emoji \\ud83d\\ude00"}', CFG)[3] == "emoji \U0001f600"  # a surrogate pair
    assert parse_line(b'{"text": "crlf line"}\r', CFG)[3] == "crlf line"
    assert parse_line(b'{"text": "x", "id": 7, "source": null}', CFG)[:2] == ("7", "unknown")


LINES = [json.dumps({"id": f"r{i}", "text": f"record number {i} " + "w" * (i % 97)}).encode() for i in range(3000)]
BLOB = b"\n".join(LINES) + b"\n"


def _read(tmp_path: Path, data: bytes) -> tuple[list[bytes], list]:
    path = tmp_path / "x.jsonl.gz"
    path.write_bytes(data)
    rows = list(gzip_lines(str(path)))
    return [line for line, damage in rows if damage is None], [(line, d) for line, d in rows if d is not None]


def test_gzip_whole_and_concatenated(tmp_path: Path) -> None:
    assert _read(tmp_path, gzip.compress(BLOB)) == (LINES, [])
    cut = BLOB.index(b"\n", len(BLOB) // 3) + 1
    assert _read(tmp_path, gzip.compress(BLOB[:cut]) + gzip.compress(BLOB[cut:]) + b"\0" * 8) == (LINES, [])
    assert _read(tmp_path, b"") == ([], [])


def test_truncated_gzip_keeps_every_line_before_the_damage(tmp_path: Path) -> None:
    data = gzip.compress(BLOB)
    good, damaged = _read(tmp_path, data[: len(data) // 2])
    assert good == LINES[: len(good)] and 0 < len(good) < len(LINES)
    (partial, damage), = damaged
    assert LINES[len(good)].startswith(partial)  # the cut record, quarantined with the damage
    assert damage.error == "truncated (the file ends inside a compressed block)"
    assert damage.compressed_offset == len(data) // 2  # the end of the file: where the stream stops
    assert damage.decompressed_offset == sum(len(line) + 1 for line in good) + len(partial)
    assert damage.lines_read == len(good)


def test_corrupt_gzip_is_located_exactly(tmp_path: Path) -> None:
    data = gzip.compress(BLOB)
    good, [(_, damage)] = _read(tmp_path, data + b"trailing junk")  # junk after a complete member
    assert good == LINES and damage.compressed_offset == len(data) + 1
    assert damage.error == "corrupt data: incorrect header check"
    good, [(_, damage)] = _read(tmp_path, b'{"text": "not gzip at all"}\n')
    assert good == [] and damage.compressed_offset == 1 and damage.decompressed_offset == 0
    bad = bytearray(data)
    bad[-8] ^= 0xFF  # the CRC-32 in the trailer
    good, [(_, damage)] = _read(tmp_path, bytes(bad))
    assert good == LINES and damage.error == "corrupt data: incorrect data check"
    assert damage.compressed_offset == len(data) - 5  # zlib notices once all four CRC bytes are in


def test_gzip_lines_split_on_newline_only(tmp_path: Path) -> None:
    data = b'{"text":"a"}\r\n{"text":"b\xe2\x80\xa8c"}\n\n  \r\n{"text":"d\re"}\x0c{"text":"f"}'
    good, damaged = _read(tmp_path, gzip.compress(data))
    assert good == [b'{"text":"a"}\r', b'{"text":"b\xe2\x80\xa8c"}', b'{"text":"d\re"}\x0c{"text":"f"}'] and not damaged


def test_quarantine_share_stop_is_one_line() -> None:
    ingest = {"documents": 90, "quarantined": 10, "quarantine_reasons": {"malformed JSON": 7, "invalid UTF-8": 3}}
    check_quarantine_share(ingest, CFG, Path("q"))  # no limit set: never stops
    check_quarantine_share(ingest, load_prepare_config(None, ["input.max_quarantine_share=0.1"]), Path("q"))
    with pytest.raises(TooManyBadRecords) as info:
        check_quarantine_share(ingest, load_prepare_config(None, ["input.max_quarantine_share=0.05"]), Path("q"))
    assert str(info.value) == ("10 of 100 input records quarantined (10.00% > input.max_quarantine_share=0.05): "
                               "malformed JSON 7, invalid UTF-8 3; see q (a rerun with a higher share resumes after ingest)")


# ------------------------------------------------------------------------------- with a Spark session

# Each line's fate in the Spark-read file: ("doc", doc_id) or ("bad", reason kind).
SPARK_LINES: list[tuple[bytes, tuple[str, str]]] = [
    (b'{"id": "cr", "text": "one record with a bare \\r escaped"}\r{"x": 1}', ("bad", "malformed JSON")),
    (b'{"id": "cr-ok", "text": "carriage returns between tokens"}\r', ("doc", "cr-ok")),
    ('{"id": "ls", "text": "line\u2028separator\u2029inside"}'.encode(), ("doc", "ls")),
    (b"\r", ("blank", "")),
    (BROKEN[0][0], ("bad", "invalid Unicode")),
    (BROKEN[2][0], ("bad", "JSON nested too deeply")),
    (BROKEN[3][0], ("bad", "number too large")),
    (BROKEN[4][0], ("bad", "wrong field type")),
    (BROKEN[11][0], ("bad", "invalid UTF-8")),
]


def _bad_inputs(root: Path) -> tuple[Path, Path, int]:
    """A plain file of broken lines, and a .jsonl.gz of good records cut at two thirds with the number of
    its lines that are complete."""
    plain = root / "broken.jsonl"
    plain.parent.mkdir(parents=True, exist_ok=True)
    plain.write_bytes(b"\n".join(line for line, _ in SPARK_LINES) + b"\n")
    data = gzip.compress(write_jsonl(root / "good.jsonl", known_corpus()).read_bytes())
    cut = root / "cut.jsonl.gz"
    cut.write_bytes(data[: len(data) * 2 // 3])
    complete = sum(1 for _, damage in gzip_lines(str(cut)) if damage is None)
    return plain, cut, complete


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_spark_reads_each_line_once_and_survives_a_cut_gzip(spark, tmp_path: Path) -> None:  # noqa: F811
    from haina.data_spark.ingest import damaged_files, documents, quarantined, read_inputs

    plain, cut, complete = _bad_inputs(tmp_path)
    parsed = read_inputs(spark, [plain, cut], CFG).cache()
    docs = {r["doc_id"]: r for r in documents(parsed).collect()}
    bad = quarantined(parsed).orderBy("row_id").collect()
    fates = [fate for _, fate in SPARK_LINES if fate[0] != "blank"]
    assert {d for d, r in docs.items() if r["file"] == str(plain)} == {name for kind, name in fates if kind == "doc"}
    plain_bad = [r["reason"] for r in bad if r["file"] == str(plain)]
    assert [r.partition(" (")[0] for r in plain_bad] == [name for kind, name in fates if kind == "bad"]
    assert docs["ls"]["text"] == "line\u2028separator\u2029inside"
    assert [r["id"] for r in known_corpus()[:complete]] == [d for d, r in docs.items() if r["file"] == str(cut)]
    assert 0 < complete < len(known_corpus())
    [damage] = damaged_files(parsed)
    assert damage["file"] == str(cut) and damage["lines_read"] == complete
    assert damage["compressed_offset"] == cut.stat().st_size
    [last] = [r for r in bad if r["file"] == str(cut)]
    assert last["reason"].startswith("damaged compressed file (truncated (the file ends inside a compressed block) "
                                     f"at compressed byte {cut.stat().st_size}, decompressed byte ")


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_job_goes_on_and_reports_damage_or_stops_on_request(
    spark, tmp_path: Path, capsys: pytest.CaptureFixture[str]  # noqa: F811
) -> None:
    from haina.data_spark.pipeline import run_pipeline
    from haina.tools.cli import run

    plain, cut, complete = _bad_inputs(tmp_path)
    # shuffle_partitions as the shared session has it: the CLI run below sets it on that session
    fast = [*TEST_OVERRIDES, "spark.shuffle_partitions=2",
            *(f"{s}.enabled=false" for s in ("heuristics", "quality", "line_dedup", "near_dedup", "embedding"))]
    report = run_pipeline(spark, [plain, cut], tmp_path / "out", load_prepare_config(None, fast), progress=False)
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    ingest = on_disk["ingest"]
    assert ingest == report["ingest"] and ingest["documents"] == complete + 2
    assert ingest["quarantine_reasons"] == {"JSON nested too deeply": 1, "damaged compressed file": 1,
                                            "invalid UTF-8": 1, "invalid Unicode": 1, "malformed JSON": 1,
                                            "number too large": 1, "wrong field type": 1}
    [damage] = ingest["damaged_files"]
    assert damage["file"] == str(cut) and damage["compressed_offset"] == cut.stat().st_size
    assert damage["lines_read"] == complete and damage["decompressed_offset"] > 0
    assert pq.read_table(tmp_path / "out" / "kept").num_rows == on_disk["kept"]["documents"]

    # 7 of complete + 9 records are bad (over 35%): a limit of 20% stops the job, in one line, with exit 2.
    def prepare(share: str) -> int:
        return run(["data", "prepare", "--input", str(plain), str(cut), "--output", str(tmp_path / "strict"),
                    "--max-quarantine-share", share, *fast])

    capsys.readouterr()
    assert prepare("0.2") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(
        f"haina data: error: 7 of {complete + 9} input records quarantined (")
    assert "> input.max_quarantine_share=0.2): " in err and not (tmp_path / "strict").exists()
    assert prepare("0.9") == 0  # a higher share goes on from the completed ingest
    assert json.loads((tmp_path / "strict" / "report.json").read_text())["resumed_stages"] == ["ingest"]
