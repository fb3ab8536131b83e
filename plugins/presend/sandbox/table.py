"""A synthetic source table generated on demand, so the sandbox serves 10M+ records in little
memory: record `i` is a pure function of the seed until it changes; changed and new records are
kept. Records are served in (cursor, index) order with keyset paging, as vendors page.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
EPOCH_MS = int(EPOCH.timestamp() * 1000)
# Base records spread over the first 28 days; the clock starts after them, so a changed record
# (stamped with the clock) always sorts after every unchanged one.
BASE_SPAN_MS = 28 * 86_400_000
CLOCK_START = EPOCH + timedelta(days=30)

M64 = (1 << 64) - 1


def mix(*values: int) -> int:
    """A fast deterministic 64-bit hash (splitmix64 steps): cheaper than random.Random per row."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (v & M64)) * 0xBF58476D1CE4E5B9 & M64
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & M64
        x ^= x >> 29
    return x


def to_ms(ts: datetime) -> int:
    return int(ts.timestamp() * 1000)


def from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


class Table:
    """`size` base records whose cursor (ms) never decreases with the index, plus changes.

    `make(i)` builds base record i; `base_ms(i)` is its cursor. `changed` maps an index to
    (cursor ms, record) for records changed or added after the start.
    """

    def __init__(
        self, size: int, make: Callable[[int], dict], per_tick: int = 1, step_ms: int = 0
    ) -> None:
        self.size = size
        self.make = make
        self.per_tick = per_tick  # records sharing one cursor value: cursors must be inclusive
        ticks = max(1, size // per_tick)
        self.step_ms = step_ms or max(1, min(600_000, BASE_SPAN_MS // ticks))
        self.changed: dict[int, tuple[int, dict]] = {}
        self.changed_keys: list[tuple[int, int]] = []  # sorted (cursor ms, index)
        self.next_index = size + 1
        self.lock = threading.RLock()

    def base_ms(self, i: int) -> int:
        return EPOCH_MS + (i // self.per_tick) * self.step_ms

    def get(self, i: int) -> dict:
        with self.lock:
            if i in self.changed:
                return self.changed[i][1]
        return self.make(i)

    def put(self, i: int, cursor_ms: int, record: dict) -> None:
        """Store a changed (or new) record with its new cursor value."""
        with self.lock:
            old = self.changed.get(i)
            if old is not None:
                self.changed_keys.pop(bisect.bisect_left(self.changed_keys, (old[0], i)))
            self.changed[i] = (cursor_ms, record)
            bisect.insort(self.changed_keys, (cursor_ms, i))
            self.next_index = max(self.next_index, i + 1)

    def count(self) -> int:
        return self.size + sum(1 for i in self.changed if i > self.size)

    def _first_base(self, since_ms: int | None) -> int:
        if since_ms is None or since_ms <= EPOCH_MS:
            return 1
        ticks = -(-(since_ms - EPOCH_MS) // self.step_ms)  # ceil
        return max(1, ticks * self.per_tick)

    def page_keys(
        self, since_ms: int | None, after: tuple[int, int] | None, limit: int
    ) -> list[tuple[int, int]]:
        """Up to `limit` keys (cursor ms, index) with cursor >= since_ms and key > after, in
        key order; `get(index)` gives each one's record."""
        out: list[tuple[int, int]] = []
        with self.lock:
            base_end = self.base_ms(self.size) if self.size else EPOCH_MS - 1
            if after is None or after[0] <= base_end:
                i = self._first_base(since_ms)
                if after is not None:
                    i = max(i, after[1] + 1)
                while i <= self.size and len(out) < limit:
                    if i not in self.changed:
                        out.append((self.base_ms(i), i))
                    i += 1
            if len(out) < limit:
                lo = (since_ms or 0, 0)
                if after is not None and after > lo:
                    start = bisect.bisect_right(self.changed_keys, after)
                else:
                    start = bisect.bisect_left(self.changed_keys, lo)
                out.extend(self.changed_keys[start : start + limit - len(out)])
        return out

    def is_changed(self, i: int) -> bool:
        return i in self.changed

    def page(
        self, since_ms: int | None, after: tuple[int, int] | None, limit: int
    ) -> list[tuple[tuple[int, int], dict]]:
        """Up to `limit` (key, record) with cursor >= since_ms and key > after, in key order."""
        with self.lock:
            return [(key, self.get(key[1])) for key in self.page_keys(since_ms, after, limit)]

    def all_records(self) -> list[dict]:
        """Every current record (for tests and small tables)."""
        return [rec for _, rec in self.page(None, None, self.size + len(self.changed))]
