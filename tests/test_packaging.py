"""The wheel maps the folders into the haina namespace and installs nothing else at the top level."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contents(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("haina-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"haina", next(t for t in top_level if t.endswith(".dist-info"))}
    for package in ("core", "plugins", "data_spark", "tools"):
        assert f"haina/{package}/__init__.py" in names
    assert "haina/core/presets/baichuan2-7b.yaml" in names
    assert "haina/core/registry.py" in names
    shipped = [p.relative_to(ROOT).as_posix() for folder in ("core", "plugins", "data_spark", "tools")
               for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".yaml", ".tsv") and "__pycache__" not in p.parts]
    missing = [module for module in shipped if f"haina/{module}" not in names]
    assert not missing, missing  # every subpackage and data file ships (a package left out of pyproject does not)
    assert not any(name.startswith("haina/tests") or name.startswith("tests/") for name in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "haina = haina.tools.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
