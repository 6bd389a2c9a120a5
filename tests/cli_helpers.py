"""Several `haina` commands in one fresh interpreter: each through the CLI's ``run``, as the console script
calls it, with its exit status and output captured. A new interpreter per command costs seconds of imports
each (torch, pyspark); one per batch keeps what the tests need of a separate process (entry points found
afresh, no Spark session or JVM of the test process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

_SCRIPT = """
import contextlib, io, json, sys
from haina.tools.cli import run
result = {}
for name, argv in json.loads(sys.argv[1]).items():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = run(argv)
    result[name] = {"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}
if "pyspark" in sys.modules:  # the Spark session the commands ran in, if they made one
    from pyspark import SparkContext
    sc = SparkContext._active_spark_context
    if sc is not None:
        result["spark"] = {"master": sc.master, "parallelism": sc.defaultParallelism}
print("RESULT " + json.dumps(result))
"""


def run_cli_batch(commands: dict[str, list[str]], *, env: dict[str, str], cwd: Path, timeout: float) -> dict:
    """``{name: {"rc", "stdout", "stderr"}}`` of each command (argv without ``haina``), run in order, and
    ``"spark"`` (master, parallelism) when they made a Spark session."""
    done = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(commands)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert done.returncode == 0 and line, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(line[len("RESULT "):])


def cli_here(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``haina ARGV`` run in this process, as the console script runs it:
    no interpreter start (seconds of imports) where nothing needs a fresh process."""
    from haina.tools.cli import run

    capsys.readouterr()
    code = run(list(argv))
    out, err = capsys.readouterr()
    return code, out, err
