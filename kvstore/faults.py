"""Fault injection: named points in the workers and the store where a test (or `pdserve chaos`) can
make the process die, raise, or stall on purpose, to check that the cluster survives its parts.

A point is a plain string ("decode.step", "decode.publish", "prefill.compute", "store.put", ...);
each component calls ``Faults.hit(point)`` there. Nothing is armed by default, and an unarmed hit
is a dict lookup.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

ACTIONS = ("exit", "raise", "delay")


class InjectedFault(RuntimeError):
    """Raised at an armed point whose action is ``raise``."""


@dataclass
class Fault:
    point: str
    action: str = "exit"  # exit: the process dies at once (as kill -9 would); raise; delay: sleep ``seconds``
    after: int = 0  # hits of the point to let pass first
    times: int = 1  # how many hits fire once armed (exit fires once: the process is gone)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"fault action must be one of {', '.join(ACTIONS)}, got {self.action!r}")
        if self.after < 0 or self.times < 1 or self.seconds < 0:
            raise ValueError("fault: after >= 0, times >= 1 and seconds >= 0")


class Faults:
    def __init__(self) -> None:
        self._armed: dict[str, Fault] = {}
        self._lock = threading.Lock()
        self.fired: dict[str, int] = {}

    def arm(self, fault: Fault) -> None:
        with self._lock:
            self._armed[fault.point] = fault

    def clear(self) -> None:
        with self._lock:
            self._armed.clear()

    def hit(self, point: str) -> None:
        if point not in self._armed:
            return
        with self._lock:
            f = self._armed.get(point)
            if f is None:
                return
            if f.after > 0:
                f.after -= 1
                return
            f.times -= 1
            if f.times <= 0:
                del self._armed[point]
            self.fired[point] = self.fired.get(point, 0) + 1
        if f.action == "exit":
            os._exit(1)  # no cleanup, no goodbye: what a crash or kill -9 leaves behind
        if f.action == "raise":
            raise InjectedFault(f"injected fault at {point}")
        time.sleep(f.seconds)
