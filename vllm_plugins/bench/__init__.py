"""Benchmarks: figures measured side by side in one run, printed and written as JSON."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(report: dict, path: str | Path) -> None:
    """``report`` as indented JSON at ``path``, its folder created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
