"""The local JVM's class archive (haina.data_spark.class_archive): written by a sample job's JVM as it exits,
then mapped by the next local session, which loads Spark's classes from it instead of from the jars."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

SESSION = """
import sys
from haina.data_spark.config import load_prepare_config
from haina.data_spark.session import get_session
cfg = load_prepare_config(None, ['spark.conf={"spark.driver.extraJavaOptions": "-Xlog:class+load=info:file=%s"}'])
spark = get_session(cfg.spark, "local[1]", 10)
print(spark.range(5).count())
"""


def test_archive_is_written_once_and_mapped_by_the_next_session(tmp_path: Path) -> None:
    env = os.environ | {"HAINA_CACHE_DIR": str(tmp_path / "cache")}
    made = subprocess.run([sys.executable, "-m", "haina.data_spark.write_class_archive"], env=env, capture_output=True,
                          text=True, timeout=540)
    assert made.returncode == 0, made.stderr[-2000:]
    archives = list((tmp_path / "cache").glob("spark-classes-*.jsa"))
    assert len(archives) == 1 and archives[0].stat().st_size > 10 << 20, (made.stdout, made.stderr[-2000:])
    assert not list((tmp_path / "cache").glob("*.partial"))
    again = subprocess.run([sys.executable, "-m", "haina.data_spark.write_class_archive"], env=env, capture_output=True,
                           text=True, timeout=60)
    assert "(exists)" in again.stdout
    log = tmp_path / "classes.log"
    used = subprocess.run([sys.executable, "-c", SESSION % log], env=env, capture_output=True, text=True,
                          timeout=300)
    assert used.returncode == 0 and used.stdout.split()[-1] == "5", used.stderr[-2000:]
    # Spark's classes come from the archive, bar the few the sample job never loaded (lambdas and generated
    # code are made at run time, from neither)
    loaded = [line for line in log.read_text().splitlines() if " org.apache.spark." in line]
    mapped = [line for line in loaded if "source: shared objects file (top)" in line]
    from_jars = [line for line in loaded if "source: jar:" in line or "source: file:" in line]
    assert len(mapped) > 3000 and len(from_jars) < len(mapped) / 50, from_jars[:5]
