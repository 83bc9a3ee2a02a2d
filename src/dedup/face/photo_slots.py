"""Slots for photos being decoded or embedded: a limit for the server, and one per caller.

Without the caller's limit, one caller's photos in flight could take every slot and leave
every other desk refused until they were done."""

from __future__ import annotations

import threading

from dedup.core.errors import RefusedUnstarted


class SlotRefused(RefusedUnstarted):
    """No slot: `reason` is "caller_limit" or "server_limit"."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class PhotoSlots:
    """At most `total` photos at once, and at most `per_holder` of any one holder's (a
    caller's identity). Without `per_holder`, or for the holder None, only `total` counts."""

    def __init__(self, total: int, per_holder: int | None = None) -> None:
        if total < 1 or (per_holder is not None and not 1 <= per_holder <= total):
            raise ValueError(f"--max-pending-images-per-caller must be 1 to the server's "
                             f"{total} photo slots, got {per_holder}")
        self.total = total
        self.per_holder = per_holder
        self._lock = threading.Lock()
        self._taken = 0
        self._by_holder: dict[str, int] = {}

    @property
    def taken(self) -> int:
        return self._taken

    def held_by(self, holder: str) -> int:
        return self._by_holder.get(holder, 0)

    def take(self, holder: str | None, field: str) -> None:
        """One slot for `holder`; else SlotRefused naming `field` and the limit."""
        key = self._key(holder)
        with self._lock:
            held = 0 if key is None else self._by_holder.get(key, 0)
            if key is not None and held >= (self.per_holder or 0):
                raise SlotRefused(
                    f"{field}: {key} has {held} photos being embedded, its limit "
                    "(max_pending_images_per_caller); retry when one is done", "caller_limit")
            if self._taken >= self.total:
                raise SlotRefused(
                    f"{field}: {self.total} photos are already being embedded; retry shortly",
                    "server_limit")
            self._taken += 1
            if key is not None:
                self._by_holder[key] = held + 1

    def give_back(self, holder: str | None) -> None:
        key = self._key(holder)
        with self._lock:
            if self._taken < 1 or (key is not None and key not in self._by_holder):
                raise RuntimeError(f"photo slots: {holder!r} gives back a slot it has not")
            self._taken -= 1
            if key is not None:
                held = self._by_holder.pop(key) - 1
                if held:
                    self._by_holder[key] = held

    def _key(self, holder: str | None) -> str | None:
        return holder if self.per_holder is not None else None
