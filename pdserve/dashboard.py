"""The live dashboard at ``/``: a static page (package data, no build step, no external assets) that
fetches ``/dashboard.json`` every second and draws it. The JSON is ``LocalCluster.status()`` (what
``pdserve status`` and the metrics endpoint show) reshaped for the page, plus the front door's recent
TTFT / TBT percentiles. One cluster snapshot serves every tab for a second, so open tabs do not
multiply Ray calls."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from importlib import resources

from pdserve.frontdoor import total_blocks

STATIC = {"/": ("dashboard.html", "text/html; charset=utf-8"),
          "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
          "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8")}


def static_file(name: str) -> bytes:
    return resources.files("pdserve").joinpath("static", name).read_bytes()


@dataclass
class Dashboard:
    door: object  # pdserve.frontdoor.FrontDoor
    capacity: dict[str, int] = field(default_factory=dict)  # store tier -> capacity in blocks (0 = none)
    max_age_s: float = 1.0
    started: float = field(default_factory=time.time)
    _cached: tuple[float, dict] | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def snapshot(self) -> dict:
        async with self._lock:
            if self._cached is None or time.monotonic() - self._cached[0] > self.max_age_s:
                status = await self.door.call(self.door.cluster.status)
                self.door.metrics.update_cluster(status)
                self._cached = (time.monotonic(), status)
            status = self._cached[1]
        return self.shape(status)

    def shape(self, s: dict) -> dict:
        door = self.door
        store = s.get("store", {})
        workers = [{"name": n, "role": w.get("role", ""), "state": w.get("state", "alive"),
                    "restarts": int(w.get("restarts", 0)), "device": w.get("device", ""),
                    "running": int(w.get("running", 0)), "waiting": int(w.get("waiting", 0)),
                    "queued_tokens": int(w.get("queued_tokens", 0)), "step_s": round(float(w.get("busy_s", 0.0)), 1),
                    "slowdown": round(float(w.get("slowdown", 1.0)), 2),
                    "transfer_slowdown": round(float(w.get("transfer_slowdown", 1.0)), 2),
                    "free_blocks": total_blocks(w.get("free_blocks", 0)), "capacity_blocks": total_blocks(w.get("capacity", 0))}
                   for n, w in s.get("workers", {}).items()]
        decode = [w for w in workers if w["role"] == "decode"]
        tiers = [{"tier": t, "blocks": int(store.get("blocks", {}).get(t, 0)), "bytes": int(store.get("bytes", {}).get(t, 0)),
                  "capacity_blocks": int(self.capacity.get(t, 0)), "hit_tokens": int(store.get("hit_tokens", {}).get(t, 0))}
                 for t in ("host", "disk")]
        return {
            "model": door.limits.model, "policy": str(s.get("policy", "")), "serving": bool(door.serving),
            "uptime_s": round(time.time() - self.started, 1), "workers": workers,
            "store": {"state": store.get("state", "alive"), "restarts": int(store.get("restarts", 0)),
                      "live_leases": int(store.get("live_leases", 0)), "tiers": tiers},
            "hits": {"predicted_tokens": int(s.get("predicted_hit_tokens", 0)),
                     "delivered_tokens": int(s.get("delivered_hit_tokens", 0)),
                     "partial_tokens": int(s.get("delivered_partial_tokens", 0))},
            "requests": {"total": int(s.get("requests", 0)), "running": sum(w["running"] for w in decode),
                         "waiting": sum(w["waiting"] for w in decode), "rejected": int(s.get("rejected", 0)),
                         "in_flight": int(s.get("in_flight", 0)), "open_streams": len(door.live)},
            "latency": door.metrics.recent.percentiles(),
            "failures": {k: int(v) for k, v in s.get("counters", {}).items()},
        }

