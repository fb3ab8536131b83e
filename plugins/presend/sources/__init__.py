"""Source streams: each declared once (endpoint, paginator, cursor, primary key) and fetched by
the one extractor in `presend.sources.extract`."""

from __future__ import annotations

from presend.sources.crm import CONTACTS
from presend.sources.events import EVENTS
from presend.sources.extract import Stream
from presend.sources.shop import ORDERS, PRODUCTS

STREAMS: dict[str, Stream] = {s.name: s for s in (CONTACTS, ORDERS, PRODUCTS, EVENTS)}


def get(name: str) -> Stream:
    """The stream declared under `name`."""
    try:
        return STREAMS[name]
    except KeyError:
        raise KeyError(f"unknown stream {name!r}; known: {sorted(STREAMS)}") from None
