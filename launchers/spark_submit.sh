#!/usr/bin/env bash
# Run the data-preparation job with spark-submit on a cluster (YARN, Kubernetes, standalone) or locally.
#   SPARK_MASTER      cluster master URL (default: local[*])
#   HAINA_ENV_ARCHIVE a packed Python environment with haina and its dependencies (venv-pack/conda-pack
#                     tar.gz); shipped with --archives and used as the executors' Python. Without it the
#                     executors must already have pyarrow, pandas, datasketch and sentencepiece, and haina
#                     itself is shipped as a wheel with --py-files.
#   SPARK_ARGS        extra spark-submit arguments (e.g. "--num-executors 64 --executor-memory 16g")
# Example:
#   SPARK_MASTER=yarn HAINA_ENV_ARCHIVE=haina-env.tar.gz launchers/spark_submit.sh \
#       prepare --input hdfs:///raw/*.jsonl.gz --output /data/prepared --config prepare.yaml
#   launchers/spark_submit.sh tokenize --prepared /data/prepared --tokenizer tok/haina.model
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
args=(--master "${SPARK_MASTER:-local[*]}" --conf spark.sql.execution.arrow.pyspark.enabled=true)
if [[ -n "${HAINA_ENV_ARCHIVE:-}" ]]; then
  args+=(--archives "${HAINA_ENV_ARCHIVE}#haina_env"
         --conf spark.pyspark.python=./haina_env/bin/python
         --conf spark.executorEnv.PYSPARK_PYTHON=./haina_env/bin/python)
else
  dist="$(mktemp -d)"
  python -m pip wheel --no-deps --quiet --wheel-dir "$dist" "$root"
  args+=(--py-files "$(ls "$dist"/haina-*.whl)")
fi
# shellcheck disable=SC2086
exec spark-submit "${args[@]}" ${SPARK_ARGS:-} "$here/spark_prepare.py" "$@"
