"""The landing zone: immutable page bodies, one folder per stream and extract attempt.

An attempt folder holds `.extracting` while its extract writes pages; the extract keeps an
exclusive lock on that file for as long as it lives and removes the file once its last page
landed. A folder whose `.extracting` nobody holds belongs to an extract that was killed (or
failed) mid-way: its pages were never loaded and never will be, because the next extract
fetches again from the committed cursor. `clean_orphans` removes such folders; complete
attempts (loaded or waiting for their load) and attempts still running are never touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from presend import settings

log = logging.getLogger(__name__)

IN_PROGRESS = ".extracting"


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


@contextmanager
def attempt(stream: str, run_id: str) -> Iterator[Path]:
    """A new attempt folder (see `run_dir`), marked in progress while the block runs.

    On success the mark goes; on an exception the folder goes (its pages will not be loaded).
    A process killed inside the block leaves the mark, unlocked: `clean_orphans` finds it.
    """
    path = run_dir(stream, run_id)
    tmp = path / f"{IN_PROGRESS}.tmp"
    fd = os.open(tmp, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        # Locked before it gets its name, so no cleaner ever sees it unlocked while we live.
        fcntl.flock(fd, fcntl.LOCK_EX)
        tmp.rename(path / IN_PROGRESS)
        try:
            yield path
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        # Unlinked while still locked: a cleaner that opened it just before sees it gone.
        (path / IN_PROGRESS).unlink()
    finally:
        os.close(fd)


def clean_orphans(stream: str) -> list[Path]:
    """Remove the stream's attempt folders left by extracts that died mid-way."""
    removed = []
    for mark in sorted((settings.landing_dir() / stream).glob(f"*/*/{IN_PROGRESS}")):
        try:
            fd = os.open(mark, os.O_RDWR)
        except FileNotFoundError:
            continue  # its extract finished meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its extract is still running
            try:
                orphan = os.stat(mark).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                orphan = False  # finished (or cleaned by another run) before we locked it
            if orphan:
                shutil.rmtree(mark.parent)
                removed.append(mark.parent)
                with contextlib.suppress(OSError):  # the run's folder, when now empty
                    mark.parent.parent.rmdir()
        finally:
            os.close(fd)
    if removed:
        log.info("%s: removed %d landing folders of killed extracts", stream, len(removed))
    return removed
