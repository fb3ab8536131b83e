"""ESP adapters: one interface, one module per vendor."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class Rejection:
    contact_id: str
    reason: str
    permanent: bool


@dataclass
class BatchOutcome:
    """What the ESP acknowledged of one batch; everything else was rejected."""

    acknowledged: list[str] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)


class EspAdapter(Protocol):
    """Upserts merge fields for contacts; never touches subscription status."""

    name: str
    max_batch_contacts: int
    max_batch_bytes: int

    def prepare(self, merge_fields: list[str]) -> None:
        """Make sure the ESP knows every merge field (create or map custom fields)."""

    def record(self, row: dict) -> dict:
        """The vendor's JSON record for one esp_merge_fields row."""

    def send(self, batch: list[tuple[str, dict]]) -> BatchOutcome:
        """Upsert (contact_id, record) pairs; return once the ESP has acknowledged them."""
