"""No file git tracks carries a merge's conflict markers (one once reached the docs)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"^(<{7} |={7}$|>{7} )", re.MULTILINE)
TEXT = (".py", ".md", ".toml", ".ini", ".json", ".yaml", ".yml", ".txt", ".cfg")


def test_tracked_text_files_have_no_conflict_markers() -> None:
    listed = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    files = [ROOT / name for name in listed if name.endswith(TEXT)]
    assert len(files) > 100  # the listing worked
    marked = [
        str(path.relative_to(ROOT))
        for path in files
        if path.is_file() and MARKER.search(path.read_text(encoding="utf-8", errors="replace"))
    ]
    assert marked == []
