"""Faults a sandbox API injects on demand, so connectors are tested against what vendors do.

A test arms a fault with `POST /_sandbox/faults` (`{"kind": …, "count": n, …}`); it fires on the
next `count` data requests. HTTP faults are applied by a middleware on every app:
- `status`: answer `status` (429, 500, 503 …) instead of the page, with `retry_after` if given;
- `slow`: hold the response `seconds` before answering (past a client's read timeout).
Data faults are applied by the app while it builds a page:
- `duplicate`: the page also repeats the record before it (a duplicate across pages);
- `malformed`: the page carries broken records (not an object, no id, a bad cursor, …);
- `added_field`: every record of the page carries a field the vendor has just added;
- `update_while_paging`: after the page is built, `share` of the records change (move ahead).
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

HTTP_KINDS = {"status", "slow"}
DATA_KINDS = {"duplicate", "malformed", "added_field", "update_while_paging"}


class Faults:
    """Armed faults of one app, and a count of the faults that fired."""

    def __init__(self) -> None:
        self.armed: list[dict] = []
        self.fired: Counter[str] = Counter()
        self.lock = threading.Lock()

    def arm(self, kind: str, count: int = 1, **params) -> None:
        if kind not in HTTP_KINDS | DATA_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}")
        with self.lock:
            self.armed.append({"kind": kind, "count": count, **params})

    def take(self, kind: str) -> dict | None:
        """The parameters of an armed fault of this kind, used up once; None if none is armed."""
        with self.lock:
            for fault in self.armed:
                if fault["kind"] == kind and fault["count"] > 0:
                    fault["count"] -= 1
                    self.fired[kind] += 1
                    if fault["count"] == 0:
                        self.armed.remove(fault)
                    return fault
        return None

    def install(self, app: FastAPI) -> None:
        """The HTTP faults middleware and the `/_sandbox/faults` endpoints."""

        @app.middleware("http")
        async def inject(request: Request, call_next):
            if request.url.path.startswith("/_sandbox"):
                return await call_next(request)
            slow = self.take("slow")
            if slow:
                await asyncio.sleep(float(slow.get("seconds", 5)))
            status = self.take("status")
            if status:
                code = int(status.get("status", 500))
                headers = {}
                if status.get("retry_after") is not None:
                    headers["Retry-After"] = str(status["retry_after"])
                return JSONResponse(
                    {"errors": f"sandbox fault: {code}"}, status_code=code, headers=headers
                )
            return await call_next(request)

        @app.post("/_sandbox/faults")
        async def arm(request: Request):
            body = await request.json()
            kind = body.pop("kind", None)
            count = int(body.pop("count", 1))
            try:
                self.arm(kind, count, **body)
            except ValueError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            return {"armed": self.armed}

        @app.get("/_sandbox/faults")
        async def show():
            return {"armed": self.armed, "fired": dict(self.fired)}

        @app.delete("/_sandbox/faults")
        async def clear():
            with self.lock:
                self.armed.clear()
            return {"armed": []}


MALFORMED_NOTE = "sandbox: malformed on purpose"


def malformed_records(id_key: str, cursor_path: list[str], sample: dict) -> list:
    """Broken copies of `sample`: a bare string, no id, a cursor that is not a timestamp."""
    no_id = {k: v for k, v in sample.items() if k != id_key}
    bad_cursor = _set_path(sample, cursor_path, "not a timestamp")
    return [MALFORMED_NOTE, no_id, bad_cursor, [sample]]


def _set_path(record: dict, path: list[str], value) -> dict:
    out = dict(record)
    if len(path) == 1:
        out[path[0]] = value
    else:
        out[path[0]] = _set_path(record.get(path[0]) or {}, path[1:], value)
    return out
