"""Where a local cluster's CPU time goes: CPU seconds per process kind over a stretch of work.

Used by ``benchmarks.gateway_vs_engine --cpu-split``: the cluster shares the machine's cores among
its gateway (the ``pdserve up`` process), its workers and store (Ray actors), Ray's own daemons and
the load generator, and a ratio below 1 against the engine alone is one of these taking its share.
Processes are grouped by what they run: a Ray actor by its class (``ray::DecodeActor``), Ray's
daemons by name, the server process as ``gateway`` (its other children by their command line); the
load generator (a child of this process) by ``resource.getrusage``.
"""
from __future__ import annotations

import os
import resource
from collections import defaultdict

import psutil

RAY_DAEMONS = ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env", "agent")


def kind_of(p: psutil.Process, gateway_pids: list[int]) -> str | None:
    """The group a process counts in, or None when it is not the cluster's."""
    try:
        cmd = p.cmdline()
    except (psutil.Error, OSError):
        return None
    if cmd and cmd[0].startswith("ray::"):
        return cmd[0].split(".")[0]  # "ray::DecodeActor.stream" -> "ray::DecodeActor"
    line = " ".join(cmd)
    for daemon in RAY_DAEMONS:
        if daemon in line and "ray" in line:
            return f"ray {daemon}"
    if p.pid in gateway_pids:
        return "gateway (pdserve up)" if p.pid == gateway_pids[0] else f"other child: {line[:40]}"
    return None


class CpuSplit:
    """CPU seconds per process kind between ``start()`` and ``stop()``."""

    def __init__(self, server_pid: int):
        self.server_pid = server_pid
        self.totals: dict[str, float] = defaultdict(float)

    def _snapshot(self) -> dict[int, tuple[str, float]]:
        try:
            server = psutil.Process(self.server_pid)
            gateway = [self.server_pid] + [c.pid for c in server.children(recursive=True)]
        except psutil.Error:
            gateway = []
        out = {}
        for p in psutil.process_iter():
            kind = kind_of(p, gateway)
            if kind is None:
                continue
            try:
                t = p.cpu_times()
            except psutil.Error:
                continue
            out[p.pid] = (kind, t.user + t.system)
        return out

    def start(self) -> None:
        self._before = self._snapshot()
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._children = ru.ru_utime + ru.ru_stime

    def stop(self) -> None:
        for pid, (kind, t) in self._snapshot().items():
            self.totals[kind] += t - self._before.get(pid, (kind, 0.0))[1]
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.totals["load generator (pdserve bench)"] += ru.ru_utime + ru.ru_stime - self._children

    def table(self, wall_s: float) -> str:
        """One line per kind: CPU seconds and the share of the machine's cores over ``wall_s``."""
        cores = os.cpu_count() or 1
        rows = sorted(self.totals.items(), key=lambda kv: -kv[1])
        lines = [f"{'process':<36}{'CPU s':>8}{'cores':>7}"]
        lines += [f"{k:<36}{v:>8.1f}{v / wall_s:>7.2f}" for k, v in rows]
        lines.append(f"{'all':<36}{sum(self.totals.values()):>8.1f}{sum(self.totals.values()) / wall_s:>7.2f}"
                     f"  (of {cores})")
        return "\n".join(lines)
