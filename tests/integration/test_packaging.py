"""The installed server must find its page without the source tree."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_carries_the_page_inside_the_package(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("trio_ws-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "trio_ws/templates/index.html" in names
    assert "trio_ws/app.py" in names
    entry_points = (
        zipfile.ZipFile(wheel)
        .read(next(n for n in names if n.endswith("entry_points.txt")))
        .decode()
    )
    assert "trio-ws = trio_ws.hosting.cli:main" in entry_points


def test_checkout_finds_the_repository_templates() -> None:
    from trio_ws.shell.app import templates_dir

    assert (templates_dir() / "index.html").is_file()
