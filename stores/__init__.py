"""Stores: the protocol, the memory and JSONL stores, and ``open_store`` for URLs.

URLs: ``memory:``, ``jsonl:PATH`` (a directory), and SQLAlchemy URLs (``sqlite:///PATH``,
``postgresql+psycopg://...``) once the SQL store exists.
"""

from __future__ import annotations

from typing import Any

from .base import DURABILITIES, Durability, Store, StoreError
from .memory import MemoryStore


def open_store(url: str, **options: Any) -> Store:
    """Open the store a URL names; ``options`` go to the store's constructor."""
    scheme, _, rest = url.partition(":")
    if scheme == "memory":
        return MemoryStore(**options)
    if scheme == "jsonl":
        if not rest:
            raise StoreError("a jsonl store URL needs a directory: jsonl:PATH")
        from .jsonl import JsonlStore

        return JsonlStore(rest, **options)
    raise StoreError(
        f"unsupported store URL {url!r}: use memory:, jsonl:PATH "
        "(SQL URLs arrive with the SQL store)"
    )


__all__ = ["DURABILITIES", "Durability", "MemoryStore", "Store", "StoreError", "open_store"]
