"""Prometheus metrics of one gateway, named in vLLM's spirit (``pdserve:...``).

Each gateway has its own CollectorRegistry, so a test process can run several servers. Request
latencies are observed as they happen; cluster-wide gauges (queues, cache tiers, leases,
predicted vs delivered hits) come from ``LocalCluster.status()`` on each refresh.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Metrics:
    model: str
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r, m = self.registry, ["model_name"]
        self.ttft = Histogram("pdserve:time_to_first_token_seconds", "Time to first token", m, buckets=_LATENCY, registry=r)
        self.itl = Histogram("pdserve:inter_token_latency_seconds", "Gap between streamed tokens", m,
                             buckets=_LATENCY, registry=r)
        self.e2e = Histogram("pdserve:e2e_request_latency_seconds", "Request latency, accepted to final message", m,
                             buckets=_LATENCY, registry=r)
        self.requests = Counter("pdserve:request_success", "Finished requests by finish reason", m + ["finished_reason"],
                                registry=r)
        self.rejected = Counter("pdserve:num_requests_rejected", "Requests rejected early (RESOURCE_EXHAUSTED)", m,
                                registry=r)
        self.errors = Counter("pdserve:request_errors", "Requests ended with an error status", m + ["code"], registry=r)
        self.prompt_tokens = Counter("pdserve:prompt_tokens", "Prompt tokens", m, registry=r)
        self.generation_tokens = Counter("pdserve:generation_tokens", "Generated tokens", m, registry=r)
        self.prefix_queries = Counter("pdserve:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      m, registry=r)
        self.prefix_hits = Counter("pdserve:prefix_cache_hits", "Prompt tokens served from the prefix cache (delivered)",
                                   m, registry=r)
        self.in_gateway = Gauge("pdserve:num_requests_in_gateway", "Streams open at this gateway", m, registry=r)
        self.running = Gauge("pdserve:num_requests_running", "Requests in decode batches", m, registry=r)
        self.waiting = Gauge("pdserve:num_requests_waiting", "Requests waiting for a decode slot", m, registry=r)
        self.hits_predicted = Gauge("pdserve:prefix_cache_hit_tokens_predicted", "Hit tokens the Conductor predicted",
                                    m, registry=r)
        self.hits_delivered = Gauge("pdserve:prefix_cache_hit_tokens_delivered", "Hit tokens the workers delivered",
                                    m, registry=r)
        self.hits_partial = Gauge("pdserve:prefix_cache_hit_tokens_partial", "Hit tokens the workers delivered past "
                                  "the last whole block (on top of the delivered gauge)", m, registry=r)
        self.kv_bytes = Gauge("pdserve:kv_cache_bytes", "KV bytes held by the store per tier", m + ["tier"], registry=r)
        self.kv_blocks = Gauge("pdserve:kv_cache_blocks", "KV blocks held by the store per tier", m + ["tier"], registry=r)
        self.bytes_moved = Gauge("pdserve:kv_bytes_transferred", "KV bytes moved in and out of the store", m, registry=r)
        self.leases = Gauge("pdserve:kv_live_leases", "Block leases not yet acknowledged", m, registry=r)
        self.serving = Gauge("pdserve:cluster_serving", "1 while a live prefill and a live decode worker exist", m,
                             registry=r)
        self.workers = Gauge("pdserve:workers", "Workers by role and state (alive, restarting, stuck, dead)",
                             m + ["role", "state"], registry=r)
        self.step_seconds = Gauge("pdserve:worker_step_seconds", "How long each worker's engine has been in its "
                                  "current step (0 between steps; past resilience.stall_timeout_s: stuck)",
                                  m + ["worker"], registry=r)
        self.slowdown = Gauge("pdserve:worker_slowdown", "Each worker's observed over its cost model's predicted "
                              "time (the placement's correction; 1 = as predicted)", m + ["worker"], registry=r)
        self.transfer_slowdown = Gauge("pdserve:worker_transfer_slowdown", "Each prefill worker's observed over "
                                       "predicted time of fetching a prefix from another node's store (1 = as "
                                       "predicted, or none yet)", m + ["worker"], registry=r)
        self.ttft_error = Gauge("pdserve:ttft_observed_over_predicted", "Median over recent requests of observed "
                                "over predicted time to the first token (0 = none yet)", m, registry=r)
        self.restarts = Counter("pdserve:worker_restarts", "Times Ray restarted a worker or the store", m + ["role"],
                                registry=r)
        self.migrations = Counter("pdserve:request_migrations", "Streams moved to another decode worker mid-stream",
                                  m, registry=r)
        self.recomputed = Counter("pdserve:recomputed_tokens", "Tokens whose KV was lost or failed to load and was "
                                  "computed again", m, registry=r)
        self.kv_load_failures = Counter("pdserve:kv_load_failures", "KV fetches that failed, timed out or failed "
                                        "their checksum", m, registry=r)
        self.nodes_lost = Counter("pdserve:nodes_lost", "Ray nodes that left with their workers and store", m,
                                  registry=r)
        self.replications = Counter("pdserve:kv_replications", "Hot prefixes copied to another node's store", m,
                                    registry=r)
        self._seen: dict[str, float] = {}  # the cluster's cumulative counts, as last copied
        self.recent = Recent()

    def finished(self, reason: str, ttft: float | None, gaps: list[float], e2e: float, prompt: int, cached: int,
                 completion: int) -> None:
        lm = self.model
        self.requests.labels(lm, reason).inc()
        if ttft is not None:
            self.ttft.labels(lm).observe(ttft)
        for g in gaps:
            self.itl.labels(lm).observe(g)
        self.e2e.labels(lm).observe(e2e)
        self.prompt_tokens.labels(lm).inc(prompt)
        self.generation_tokens.labels(lm).inc(completion)
        self.prefix_queries.labels(lm).inc(prompt)
        self.prefix_hits.labels(lm).inc(cached)
        self.recent.add(ttft, gaps)

    def update_cluster(self, status: dict) -> None:
        """Copies a ``LocalCluster.status()`` snapshot into the gauges."""
        lm = self.model
        workers = [w for w in status.get("workers", {}).values() if "running" in w]
        self.running.labels(lm).set(sum(w["running"] for w in workers))
        self.waiting.labels(lm).set(sum(w["waiting"] for w in workers))
        self.hits_predicted.labels(lm).set(status.get("predicted_hit_tokens", 0))
        self.hits_delivered.labels(lm).set(status.get("delivered_hit_tokens", 0))
        self.hits_partial.labels(lm).set(status.get("delivered_partial_tokens", 0))
        store = status.get("store", {})
        for tier, n in store.get("bytes", {}).items():
            self.kv_bytes.labels(lm, tier).set(n)
        for tier, n in store.get("blocks", {}).items():
            self.kv_blocks.labels(lm, tier).set(n)
        self.bytes_moved.labels(lm).set(store.get("bytes_in", 0) + store.get("bytes_out", 0))
        self.leases.labels(lm).set(store.get("live_leases", 0))
        self.serving.labels(lm).set(1 if status.get("serving", True) else 0)
        states = {(r, st): 0 for r in ("prefill", "decode") for st in ("alive", "restarting", "stuck", "dead")}
        for w in status.get("workers", {}).values():
            if w.get("role") and w.get("state"):
                states[(w["role"], w["state"])] = states.get((w["role"], w["state"]), 0) + 1
        for (role, state), n in states.items():
            self.workers.labels(lm, role, state).set(n)
        for name, w in status.get("workers", {}).items():
            self.step_seconds.labels(lm, name).set(float(w.get("busy_s", 0.0)))
            self.slowdown.labels(lm, name).set(float(w.get("slowdown", 1.0)))
            if "transfer_slowdown" in w:
                self.transfer_slowdown.labels(lm, name).set(float(w["transfer_slowdown"]))
        self.ttft_error.labels(lm).set(float(status.get("ttft_observed_over_predicted", 0.0)))
        restarts = {r: 0 for r in ("prefill", "decode")}
        for w in status.get("workers", {}).values():
            if w.get("role") in restarts:
                restarts[w["role"]] += int(w.get("restarts", 0))
        restarts["store"] = int(store.get("restarts", 0))
        counters = status.get("counters", {})
        for role, n in restarts.items():
            self._advance(f"restarts.{role}", n, self.restarts.labels(lm, role))
        self._advance("migrations", counters.get("migrations", 0), self.migrations.labels(lm))
        self._advance("recomputed", counters.get("recomputed_tokens", 0), self.recomputed.labels(lm))
        self._advance("kv_load_failures", counters.get("kv_load_failures", 0), self.kv_load_failures.labels(lm))
        self._advance("nodes_lost", counters.get("nodes_lost", 0), self.nodes_lost.labels(lm))
        self._advance("replications", counters.get("replications", 0), self.replications.labels(lm))

    def _advance(self, key: str, total: float, counter) -> None:
        """A Prometheus counter follows a cumulative count the cluster keeps (never goes back)."""
        delta = total - self._seen.get(key, 0)
        if delta > 0:
            counter.inc(delta)
            self._seen[key] = total

    def serve_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Starts the /metrics endpoint (a daemon thread); returns the bound port. Any other path
        is a 404 (prometheus_client's own server answers every path with the metrics)."""
        metrics_app = make_wsgi_app(self.registry)

        def app(environ, start_response):
            if environ.get("PATH_INFO", "") in ("/metrics", "/metrics/"):
                return metrics_app(environ, start_response)
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"not found: pdserve's metrics are at /metrics\n"]

        httpd = make_server(host, port, app, _ThreadingWSGIServer, handler_class=_QuietHandler)
        threading.Thread(target=httpd.serve_forever, name="pdserve-metrics", daemon=True).start()
        return httpd.server_address[1]


class Recent:
    """TTFT and token gaps of the last requests (the dashboard's "recent percentiles"; Prometheus
    histograms only hold totals since start)."""

    def __init__(self, requests: int = 512, gaps: int = 8192):
        self.ttft: deque[float] = deque(maxlen=requests)
        self.gaps: deque[float] = deque(maxlen=gaps)
        self.lock = threading.Lock()

    def add(self, ttft: float | None, gaps: list[float]) -> None:
        with self.lock:
            if ttft is not None:
                self.ttft.append(ttft)
            self.gaps.extend(gaps)

    def percentiles(self, ps=(50, 90, 99)) -> dict[str, dict[str, float]]:
        """{"ttft_s": {"p50": ..}, "tbt_s": {...}, "n": ...} over the window (zeros when empty)."""
        with self.lock:
            series = {"ttft_s": sorted(self.ttft), "tbt_s": sorted(self.gaps)}
        out = {name: {f"p{p}": (xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else 0.0) for p in ps}
               for name, xs in series.items()}
        out["samples"] = {"requests": len(series["ttft_s"]), "gaps": len(series["tbt_s"])}
        return out


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:  # scrapes are not news
        pass
