"""Stores: the protocol, the memory and JSONL stores, and ``open_store`` for URLs.

URLs: ``memory:``, ``jsonl:PATH`` (a directory), and SQLAlchemy URLs (``sqlite:///PATH``,
``postgresql+psycopg://...``) for the SQL store.
"""

from __future__ import annotations

from typing import Any

from .base import (
    DURABILITIES,
    Durability,
    Store,
    StoreError,
    SupportsCheckpoints,
)
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
    if scheme.partition("+")[0] in ("sqlite", "postgresql", "postgres"):
        from .sql import SqlStore

        return SqlStore(url, **options)
    raise StoreError(
        f"unsupported store URL {url!r}: use memory:, jsonl:PATH, sqlite:///PATH or "
        "postgresql+psycopg://..."
    )


__all__ = [
    "DURABILITIES",
    "Durability",
    "MemoryStore",
    "Store",
    "StoreError",
    "SupportsCheckpoints",
    "open_store",
]
