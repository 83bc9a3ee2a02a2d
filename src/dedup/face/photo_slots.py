"""Slots for photos being decoded or embedded: a limit for the server, and one per caller.

Without the caller's limit, one caller's photos in flight could take every slot and leave
every other desk refused until they were done."""

from __future__ import annotations

import threading

from dedup.core.errors import ResourceExhausted


class PhotoSlots:
    """At most `total` photos at once, and at most `per_holder` of any one holder's (a
    caller's identity; None: no holder, or no limit per holder)."""

    def __init__(self, total: int, per_holder: int | None = None) -> None:
        if per_holder is not None and per_holder < 1:
            raise ValueError(f"max_pending_images_per_caller must be >= 1, got {per_holder}")
        self.total = total
        self.per_holder = per_holder
        self._lock = threading.Lock()
        self._taken = 0
        self._by_holder: dict[str, int] = {}

    def take(self, holder: str | None, field: str) -> None:
        """One slot for `holder`; else ResourceExhausted naming `field` and the limit."""
        limit = self.per_holder
        key = holder if limit is not None else None
        with self._lock:
            held = self._by_holder.get(key, 0) if key is not None else 0
            if limit is not None and key is not None and held >= limit:
                raise ResourceExhausted(
                    f"{field}: {holder} has {held} photos being embedded, its limit "
                    "(max_pending_images_per_caller); retry when one is done")
            if self._taken >= self.total:
                raise ResourceExhausted(
                    f"{field}: {self.total} photos are already being embedded; retry shortly")
            self._taken += 1
            if key is not None:
                self._by_holder[key] = held + 1

    def give_back(self, holder: str | None) -> None:
        with self._lock:
            self._taken -= 1
            if holder is not None and self.per_holder is not None:
                held = self._by_holder.pop(holder) - 1
                if held:
                    self._by_holder[holder] = held
