"""Liveness of the cluster's actors, from the driver's side.

Ray restarts a dead worker or store (they are created with ``max_restarts``); this thread notices
it. Every ``interval_s`` it pings each actor (a method in its own concurrency group, so a long
prefill does not delay the answer). An actor that has not answered for ``unresponsive_s``, or
whose ping fails, is taken out of placement; one that answers again is put back, and if it
answers as a new incarnation (Ray restarted it) that counts as a restart. A store that comes back
as a new incarnation is empty: the Conductor forgets every block it held (``on_store_reset(name)``).
Members whose node is gone are ``retire``d: dead for good, never pinged again. ``on_round`` runs
once per round (the node watch); ``on_report(name, load)`` gets each worker's report (the Conductor
corrects its cost model by the speeds they show).

A worker's ping answers while its engine steps (it does not wait for the engine), so a long step (a
512-token chunk of a big model on CPU) is not taken for a lost worker; the ping reports how long the
current step has run (``busy_s``), and one that has run longer than ``stuck_s`` (the cluster passes the
streams' ``stall_timeout_s``, after which its requests move anyway) takes the worker out of placement.

States: ``alive`` (answered), ``restarting`` (Ray is restarting it, or it does not answer), ``stuck``
(it answers, but its engine has been in one step longer than ``stuck_s``), ``dead`` (Ray will not
restart it).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Member:
    name: str
    role: str  # prefill | decode | store
    handle: object
    state: str = "alive"
    incarnation: str = ""
    restarts: int = 0
    since: float = field(default_factory=time.monotonic)  # in this state since
    load: dict = field(default_factory=dict)  # the last ping's report
    pending: object = None  # the ping in flight
    sent: float = 0.0


class Supervisor:
    def __init__(self, members: list[Member], on_down: Callable[[str], None], on_up: Callable[[Member], bool],
                 on_store_reset: Callable[[str], None], interval_s: float = 0.25, unresponsive_s: float = 1.0,
                 on_round: Callable[[], None] | None = None, stuck_s: float | None = None,
                 on_report: Callable[[str, dict], None] | None = None):
        import ray

        self.ray = ray
        self.members = {m.name: m for m in members}
        self.on_down, self.on_up, self.on_store_reset = on_down, on_up, on_store_reset
        self.interval_s, self.unresponsive_s, self.stuck_s = interval_s, unresponsive_s, stuck_s
        self.on_round, self.on_report = on_round, on_report
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pdserve-supervisor", daemon=True)

    def start(self) -> "Supervisor":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def suspect(self, name: str) -> None:
        """A request saw ``name`` fail: out of placement now, back when a ping answers."""
        with self.lock:
            m = self.members[name]
            if m.state == "alive":
                self._set(m, "restarting")
        self.on_down(name)

    def retire(self, names: list[str]) -> None:
        """These members are gone for good (their node left the cluster): dead, out of placement."""
        for name in names:
            m = self.members.get(name)
            if m is None:
                continue
            with self.lock:
                self._set(m, "dead")
                m.pending = None
            if m.role != "store":
                self.on_down(name)

    def snapshot(self) -> dict[str, dict]:
        with self.lock:
            return {n: {"role": m.role, "state": m.state, "restarts": m.restarts, "load": dict(m.load),
                        "for_s": time.monotonic() - m.since} for n, m in self.members.items()}

    def state(self, name: str) -> str:
        with self.lock:
            return self.members[name].state

    def live(self, role: str) -> list[str]:
        with self.lock:
            return [n for n, m in self.members.items() if m.role == role and m.state == "alive"]

    # -- the loop ----------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.on_round is not None:
                    self.on_round()
                self._round()
            except Exception:  # noqa: BLE001 - the watcher must outlive whatever it watches
                pass
            self._stop.wait(self.interval_s)

    def _round(self) -> None:
        ray, now = self.ray, time.monotonic()
        for m in self.members.values():
            if m.pending is None and m.state != "dead":
                m.pending, m.sent = m.handle.ping.remote(), now
        refs = [m.pending for m in self.members.values() if m.pending is not None]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=self.interval_s)
        now = time.monotonic()
        for m in list(self.members.values()):
            if m.pending is None or m.state == "dead":
                continue
            ready, _ = ray.wait([m.pending], timeout=0)
            if not ready:
                if now - m.sent > self.unresponsive_s and m.state == "alive":
                    self._down(m, "restarting")
                continue
            ref, m.pending = m.pending, None
            try:
                report = ray.get(ref)
            except ray.exceptions.ActorDiedError:
                self._down(m, "dead")
                continue
            except Exception:  # noqa: BLE001 - unavailable (restarting) or failed mid-restart
                self._down(m, "restarting")
                continue
            self._answered(m, report)

    def _down(self, m: Member, state: str) -> None:
        with self.lock:
            changed = m.state != state
            self._set(m, state)
        if changed:
            self.on_down(m.name)

    def _answered(self, m: Member, report: dict) -> None:
        if not report.get("ready", True):  # constructed, not loaded yet
            self._down(m, "restarting")
            return
        restarted = bool(m.incarnation) and report.get("incarnation") != m.incarnation
        with self.lock:
            m.load = {k: v for k, v in report.items() if k not in ("ready", "incarnation")}
            if restarted:
                m.restarts += 1
            m.incarnation = report.get("incarnation", m.incarnation)
            was, load = m.state, m.load
        if self.on_report is not None and m.role != "store":
            self.on_report(m.name, load)
        if self.stuck_s is not None and report.get("busy_s", 0.0) > self.stuck_s:
            self._down(m, "stuck")  # back in placement once a ping finds its engine between steps again
            return
        if m.role == "store":
            if restarted:
                self.on_store_reset(m.name)
            with self.lock:
                self._set(m, "alive")
            return
        if was != "alive" or restarted:
            if not self.on_up(m):  # refused at the handshake: stays out of placement
                with self.lock:
                    self._set(m, "dead")
                return
        with self.lock:
            self._set(m, "alive")

    @staticmethod
    def _set(m: Member, state: str) -> None:
        if m.state != state:
            m.state, m.since = state, time.monotonic()
