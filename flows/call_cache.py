"""The example store as the LLM gateway's call cache (`agents.gateway.CallCache`):
`Store.call_cache()` returns one."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flows.store import Store


class StoreCallCache:
    """The store as the gateway's call cache (agents.gateway.CallCache).

    `with_records`: the gateway puts a reply and records its call back to back (no await
    between), so `put` only holds the reply and the caller's `on_call` hands it to
    `Store.record_call(..., reply=cache.take(request_hash))`: one transaction a call, not
    two. Replies never taken (none is expected) are simply not cached."""

    def __init__(self, store: Store, with_records: bool = False):
        self._store = store
        self._with_records = with_records
        self._held: dict[str, dict] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> dict | None:
        return self._store.cache_get(key)

    def put(self, key: str, *, api: str, model: str, response: dict) -> None:
        if not self._with_records:
            self._store.cache_put(key, api=api, model=model, response=response)
            return
        with self._lock:
            self._held[key] = {"api": api, "model": model, "response": response}

    def take(self, key: str) -> dict | None:
        """The reply `put` holds for this request hash, for its call record to write."""
        with self._lock:
            return self._held.pop(key, None)
