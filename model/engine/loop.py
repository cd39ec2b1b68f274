"""An engine stepped on a background thread, for workers that take requests on other threads.

All engine access goes through ``lock``; ``on_outputs`` runs under it after every step.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

from model.engine.engine import Engine
from model.engine.sequence import RequestOutput


class EngineLoop:
    def __init__(self, engine: Engine, on_outputs: Callable[[list[RequestOutput]], None], name: str = "engine"):
        self.engine = engine
        self.on_outputs = on_outputs
        self.lock = threading.RLock()
        self.step_times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self.lock:
                busy = self.engine.has_work()
                if busy:
                    t = time.perf_counter()
                    outs = self.engine.step()
                    self.step_times.append(time.perf_counter() - t)
                    del self.step_times[:-1000]
                    self.on_outputs(outs)
            if not busy:
                time.sleep(0.002)

    def mean_step_s(self, last: int = 50) -> float:
        recent = self.step_times[-last:]
        return sum(recent) / len(recent) if recent else 0.0

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
