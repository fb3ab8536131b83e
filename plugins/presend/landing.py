"""The landing zone: immutable page bodies, one folder per stream and extract attempt."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from pathlib import Path

from presend import settings


def run_dir(stream: str, run_id: str) -> Path:
    """A new folder for one extract attempt of one stream.

    Every attempt (a retry, a cleared and rerun task) gets its own folder, so landed files are
    never overwritten and the loader's record of loaded files stays true.
    """
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", run_id)
    attempt = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    path = settings.landing_dir() / stream / safe / attempt
    path.mkdir(parents=True)
    return path


def write_page(folder: Path, number: int, body: bytes) -> Path:
    """Write one page body as it came over the wire; the rename makes it appear whole."""
    path = folder / f"page-{number:06d}.json"
    tmp = path.with_suffix(".part")
    tmp.write_bytes(body)
    tmp.replace(path)
    return path
