"""What can go wrong between a worker and the store, as our own exceptions with short messages
(never a Ray class name or actor id: these texts can reach a client)."""
from __future__ import annotations


class StoreUnavailable(RuntimeError):
    """The KV store did not answer (dead, restarting, or slower than the timeout)."""


class KVLoadError(RuntimeError):
    """A prefix's KV could not be loaded: a block is gone, damaged (checksum), or the fetch failed."""
