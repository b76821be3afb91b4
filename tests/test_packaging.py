"""A wheel carries what `mmtune demo` needs: the run configs and the shipped tiny base."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_configs_and_assets(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("mmtune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("configs", "assets"):
        shipped = [p for p in (ROOT / folder).rglob("*") if p.is_file()]
        assert shipped
        for path in shipped:
            assert f"mmtune/{path.relative_to(ROOT)}" in names, f"{path.relative_to(ROOT)} is missing from the wheel"
    assert "mmtune/methods/spider.py" in names and "mmtune/data/formats/__init__.py" in names
