"""The landing zone: immutable page bodies, one folder per stream and run."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from presend import settings


def run_dir(stream: str, run_id: str) -> Path:
    """A fresh folder for one extract run of one stream (a rerun starts it over)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", run_id)
    path = settings.landing_dir() / stream / safe
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def write_page(folder: Path, number: int, body: bytes) -> Path:
    """Write one page body as it came over the wire; the rename makes it appear whole."""
    path = folder / f"page-{number:06d}.json"
    tmp = path.with_suffix(".part")
    tmp.write_bytes(body)
    tmp.replace(path)
    return path
