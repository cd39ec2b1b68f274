"""The transport-neutral front door: what the gRPC gateway and the OpenAI HTTP edge share.

One code path for both transports: validation (``pdserve.validate``, off the event loop), admission
(the stream cap and in-flight request ids), placement and early rejection (``cluster.submit``, the
Conductor), the token stream with stop strings and detokenization, cancellation (a stream that ends
early for any reason frees its slots, blocks and leases in the cluster), and the usage and timings
of the final message. A transport only maps ``Refused`` to its own status (gRPC code, HTTP status)
and ``Delta`` / ``Final`` to its own messages.

The cluster's calls block on Ray, so each stream is pumped by a thread of the front door's pool into
an asyncio queue: the event loop never blocks and hundreds of streams run at once.
"""
from __future__ import annotations

import asyncio
import ipaddress
import itertools
import math
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pdserve.driver import Rejected
from pdserve.errors import ServeError, client_message
from pdserve.metrics import Metrics
from pdserve.textcodec import Codec, Detokenizer
from pdserve.validate import FieldError, Limits, Prepared, prepare


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 0
    max_message_bytes: int = 4 * 2**20
    max_prompt_tokens: int = 0
    max_tokens_limit: int = 4096
    max_streams: int = 512
    tls_cert: str = ""  # PEM file paths
    tls_key: str = ""
    auth_token: str = ""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(opts: ServerOptions) -> None:
    """Refuses a non-loopback bind unless it has both TLS and a bearer token (gRPC and HTTP alike)."""
    if not is_loopback(opts.host) and not (opts.tls_cert and opts.tls_key and opts.auth_token):
        raise ValueError(f"refusing to bind {opts.host}: a non-loopback address needs TLS (server.tls_cert and "
                         "server.tls_key) and a bearer token (server.auth_token_env)")


class Refused(ServeError):
    """A request the front door ends: ``code`` names a grpc.StatusCode; ``field`` the request field at
    fault (validation); ``rejected`` marks the Conductor's early rejection (HTTP: 429 + Retry-After, gRPC: the
    ``grpc-retry-pushback-ms`` trailer), with ``retry_after_s`` the wait after which it predicts admission."""

    def __init__(self, code: str, message: str, field: str | None = None, why: str = "", rejected: bool = False,
                 retry_after_s: float | None = None):
        super().__init__(code, message)
        self.field, self.why, self.rejected = field, why or message, rejected
        self.retry_after_s = retry_after_s

    def retry_after(self) -> int:
        """Whole seconds a client should wait before retrying a rejected request (at least 1)."""
        return max(1, math.ceil(self.retry_after_s or 0.0))


class StopMatcher:
    """Cuts streamed text before the first stop string, holding back a tail that may start one."""

    def __init__(self, stop: tuple[str, ...]):
        self.stop, self.pending, self.hold = stop, "", max((len(s) for s in stop), default=1) - 1

    def feed(self, text: str) -> tuple[str, bool]:
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        cut = max(0, len(self.pending) - self.hold)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class Delta:
    """Text and tokens streamed since the last delta (``logprobs`` per token when asked for)."""
    text: str
    token_ids: list[int]
    logprobs: list[float] | None = None


@dataclass
class Final:
    request_id: str
    reason: str  # "length" | "stop" | ...
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    queue_s: float
    ttft_s: float
    mean_tbt_s: float
    p99_tbt_s: float
    e2e_s: float


@dataclass
class Stream:
    """One admitted request: what ``close`` needs to free it, whatever way it ends."""
    rid: str
    req: Prepared
    sub: object  # pdserve.driver.Submitted
    t0: float
    cluster_done: bool = False  # True once the cluster holds nothing more for this request
    closed: bool = False
    times: list[float] = field(default_factory=list)


class FrontDoor:
    def __init__(self, cluster, opts: ServerOptions, metrics: Metrics):
        cfg = cluster.model_config
        self.cluster, self.opts, self.metrics = cluster, opts, metrics
        self.codec = Codec(cluster.tokenizer, cfg.vocab_size, cfg.eos_token_id if cluster.tokenizer is None
                           else cluster.tokenizer.eos_token_id)
        self.limits = Limits(cfg.name, cfg.vocab_size, cfg.max_seq_len, opts.max_prompt_tokens, opts.max_tokens_limit)
        self.pool = ThreadPoolExecutor(max_workers=opts.max_streams + 16, thread_name_prefix="pdserve-gw")
        self.live: set[str] = set()
        self.serving = True  # the health both transports report (kept by watch_health)
        self._ids = itertools.count()
        self._lock = threading.Lock()

    async def call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def prepare(self, request, chat: bool) -> Prepared:
        """A GenerateRequest / ChatRequest -> Prepared, validated off the event loop (it tokenizes)."""
        return await self.call(self.check, request, chat)

    def check(self, request, chat: bool) -> Prepared:
        """``prepare``'s work, for a caller already off the event loop; ``Refused`` names the field."""
        try:
            return prepare(request, self.limits, self.codec, chat)
        except FieldError as e:
            code = "NOT_FOUND" if e.not_found else "INVALID_ARGUMENT"
            self.metrics.errors.labels(self.limits.model, code).inc()
            raise Refused(code, str(e), e.field, e.why) from None

    async def open(self, req: Prepared, t0: float | None = None) -> Stream:
        """Admits and places the request (``Refused`` if it may not run); the caller must ``close``."""
        rid = self._admit(req)
        s = Stream(rid, req, None, time.perf_counter() if t0 is None else t0)
        self.metrics.in_gateway.labels(self.limits.model).inc()
        placing = self.pool.submit(self.cluster.submit, req.prompt, req.params, req.session_id, rid, req.ttft_s,
                                   req.tbt_s, req.priority)
        try:
            s.sub = await asyncio.wrap_future(placing)
        except Rejected as e:
            s.cluster_done = True
            self.close(s)
            self.metrics.rejected.labels(self.limits.model).inc()
            raise Refused("RESOURCE_EXHAUSTED", f"rejected: {e.reason}", rejected=True,
                          retry_after_s=e.retry_after_s) from None
        except BaseException as e:  # noqa: BLE001 - a status of ours, never the exception's text
            s.cluster_done = True
            self.close(s)
            if isinstance(e, asyncio.CancelledError):  # placed meanwhile, maybe: cancel once placing is over
                placing.add_done_callback(lambda _: self.pool.submit(self.cluster.cancel, rid))
                raise
            code, message = client_message(e)
            self.metrics.errors.labels(self.limits.model, code).inc()
            raise Refused(code, message) from None
        return s

    def close(self, s: Stream) -> None:
        """Frees what the request still holds in the cluster (cancel, deadline, disconnect, error).
        Idempotent; never blocks the event loop."""
        if s.closed:
            return
        s.closed = True
        self.metrics.in_gateway.labels(self.limits.model).dec()
        if not s.cluster_done:
            s.cluster_done = True
            self.pool.submit(self.cluster.cancel, s.rid)
        with self._lock:
            self.live.discard(s.rid)

    def _admit(self, req: Prepared) -> str:
        with self._lock:
            if len(self.live) >= self.opts.max_streams:
                raise Refused("RESOURCE_EXHAUSTED", f"gateway: {self.opts.max_streams} streams already open")
            if req.request_id and req.request_id in self.live:
                raise Refused("ALREADY_EXISTS", f"request_id: {req.request_id!r} is in flight", "request_id")
            rid = req.request_id or f"gw-{next(self._ids)}"
            self.live.add(rid)
            return rid

    async def events(self, s: Stream) -> AsyncIterator[Delta | Final]:
        """The request's deltas, then its Final; ``Refused`` on a failure. Closes the stream at the end."""
        try:
            async for e in self._pump(s):
                yield e
        finally:
            self.close(s)

    async def _pump(self, s: Stream) -> AsyncIterator[Delta | Final]:
        q = self._start_pump(s)
        detok, stops = Detokenizer(self.codec), StopMatcher(s.req.stop)
        n, reason = 0, None
        while reason is None:
            item = await q.get()
            if item is None:
                raise Refused("INTERNAL", "the cluster ended the stream without a final message")
            if isinstance(item, BaseException):
                code, message = client_message(item)
                self.metrics.errors.labels(self.limits.model, code).inc()
                raise Refused(code, f"request {s.rid}: {message}")
            s.cluster_done = item.finished
            if item.finish_reason and item.finish_reason.startswith("error"):
                self.metrics.errors.labels(self.limits.model, "INTERNAL").inc()
                raise Refused("INTERNAL", f"request {s.rid}: {item.finish_reason}")
            if item.finish_reason == "abort":
                raise Refused("ABORTED", f"request {s.rid} was aborted by the cluster")
            if item.token_ids:
                s.times.extend([time.perf_counter()] * len(item.token_ids))
                n += len(item.token_ids)
                text, hit = stops.feed(detok.add(item.token_ids))
                reason = "stop" if hit else None
                yield Delta(text, list(item.token_ids), list(item.logprobs) if item.logprobs else None)
            if item.finished and reason is None:
                reason = item.finish_reason or "stop"
                tail = stops.feed(detok.flush())[0] + stops.flush()
                if tail:
                    yield Delta(tail, [])
        if not s.cluster_done:  # a stop string ended it early: free the cluster before the final message
            s.cluster_done = True
            await self.call(self.cluster.cancel, s.rid)
        yield self._final(s, reason, n)

    def _start_pump(self, s: Stream) -> asyncio.Queue:
        loop, q = asyncio.get_running_loop(), asyncio.Queue()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the loop is gone (server stopping)
                pass

        def pump() -> None:
            try:
                for out in self.cluster.stream(s.sub):
                    put(out)
            except BaseException as e:  # noqa: BLE001 - handed to the event loop as a status
                put(e)
            put(None)

        self.pool.submit(pump)
        return q

    def _final(self, s: Stream, reason: str, n: int) -> Final:
        end, sub, times = time.perf_counter(), s.sub, s.times
        handoff = sub.handoff.result() if sub.handoff.done() and not sub.handoff.exception() else None
        cached = handoff.cached_tokens if handoff is not None else 0
        ttft = times[0] - s.t0 if times else None
        gaps = sorted(b - a for a, b in zip(times, times[1:]) if b > a)
        worked = sum(handoff.timings.values()) if handoff is not None else 0.0
        self.metrics.finished(reason, ttft, gaps, end - s.t0, len(s.req.prompt), cached, n)
        return Final(s.rid, reason, len(s.req.prompt), cached, n, queue_s=max(0.0, (ttft or 0.0) - worked),
                     ttft_s=ttft or 0.0, mean_tbt_s=sum(gaps) / len(gaps) if gaps else 0.0,
                     p99_tbt_s=gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))] if gaps else 0.0, e2e_s=end - s.t0)


def total_blocks(v) -> int:
    """Free/capacity blocks come per KV group (a dict or list) or as one number."""
    if isinstance(v, dict):
        return int(sum(v.values()))
    if isinstance(v, (list, tuple)):
        return int(sum(v))
    return int(v)
