"""Leases (design invariant 4): blocks handed to another worker stay pinned until acknowledged,
and a lease that is never acknowledged expires, so a crashed worker can't pin memory forever."""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Lease:
    lease_id: str
    keys: tuple[int, ...]
    expires_at: float
    owner: str = ""


class Leases:
    def __init__(self, pin: Callable[[int], None], unpin: Callable[[int], None], clock=time.monotonic):
        self._pin, self._unpin, self._clock = pin, unpin, clock
        self.live: dict[str, Lease] = {}
        self._ids = itertools.count()
        self.expired = 0

    def grant(self, keys: list[int], ttl_s: float, owner: str = "") -> Lease:
        if ttl_s <= 0:
            raise ValueError(f"lease ttl_s must be positive, got {ttl_s}")
        lease = Lease(f"lease-{owner}-{next(self._ids)}", tuple(keys), self._clock() + ttl_s, owner)
        for k in lease.keys:
            self._pin(k)
        self.live[lease.lease_id] = lease
        return lease

    def release(self, lease_id: str) -> bool:
        """Unpin a lease's blocks; False (and nothing else) for an unknown or already released lease."""
        lease = self.live.pop(lease_id, None)
        if lease is None:
            return False
        for k in lease.keys:
            self._unpin(k)
        return True

    def release_owned(self, owner: str) -> int:
        """Release every live lease granted to ``owner`` (a worker that died before handing them off: nobody
        else knows their ids); returns how many."""
        if not owner:
            raise ValueError("release_owned needs an owner: leases granted without one are released by id")
        mine = [lid for lid, lease in self.live.items() if lease.owner == owner]
        for lid in mine:
            self.release(lid)
        return len(mine)

    def reclaim_expired(self) -> list[str]:
        now = self._clock()
        gone = [lid for lid, lease in self.live.items() if lease.expires_at <= now]
        for lid in gone:
            self.release(lid)
        self.expired += len(gone)
        return gone
