"""The application file spark-submit runs: ``haina data prepare`` (or ``tokenize --prepared``) with its
arguments; haina itself arrives on the executors as the wheel in --py-files or inside the packed
environment of --archives."""

import sys

from haina.tools.cli import run

if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] in ("prepare", "tokenize") else "prepare"
    rest = sys.argv[2:] if len(sys.argv) > 1 and sys.argv[1] in ("prepare", "tokenize") else sys.argv[1:]
    sys.exit(run(["data", command, *rest]))
