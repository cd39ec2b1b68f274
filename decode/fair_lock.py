"""A lock taken in the order it was asked for.

The decode worker's engine loop lets go of the engine lock after each step and takes it again at
once; with a plain lock the releasing thread nearly always wins that race, so a thread that submits a
request, cancels one or answers the supervisor's ping waited for tens of steps. Taking turns by ticket
bounds the wait to the steps already asked for (``python -m benchmarks.decode_lock``, figures in
BENCHMARKS.md: ping p90 69-89 ms with a plain lock, ~6 ms with this one, on ~5 ms steps).
"""
from __future__ import annotations

import threading


class FairLock:
    """First come, first served; reentrant (the thread that holds it may take it again)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._next_ticket = 0
        self._serving = 0
        self._owner: int | None = None
        self._depth = 0

    def acquire(self) -> None:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return
            ticket = self._next_ticket
            self._next_ticket += 1
            while ticket != self._serving:
                self._cond.wait()
            self._owner, self._depth = me, 1

    def release(self) -> None:
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("FairLock released by a thread that does not hold it")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._serving += 1
                self._cond.notify_all()

    def __enter__(self) -> FairLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
