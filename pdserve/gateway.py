"""The gRPC front door (``pdserve.v1``, grpc.aio) in front of a LocalCluster.

The cluster's calls block on Ray, so each stream is pumped by a thread of the gateway's own pool
into an asyncio queue: the event loop never blocks and hundreds of streams run at once. Every
accepted request ends in a final message or an explicit status; a stream that ends early
(client cancel, deadline, stop string, error) cancels the request in the cluster, which frees
its slots, blocks and leases.

What a client reads on a failure is a status code and a short message of ours (``pdserve.errors``),
never an exception's own text. The health service follows the cluster: NOT_SERVING while it has no
live prefill or no live decode worker, SERVING again once it has.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdserve.driver import Rejected
from pdserve.errors import client_message
from pdserve.metrics import Metrics
from pdserve.textcodec import Codec, Detokenizer
from pdserve.validate import FieldError, Limits, Prepared, prepare
from protos.pdserve.v1 import pdserve_pb2 as pb
from protos.pdserve.v1 import pdserve_pb2_grpc as pb_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["PDServe"].full_name


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
    """Refuses a non-loopback bind unless it has both TLS and a bearer token."""
    if not is_loopback(opts.host) and not (opts.tls_cert and opts.tls_key and opts.auth_token):
        raise ValueError(f"refusing to bind {opts.host}: a non-loopback address needs TLS (server.tls_cert and "
                         "server.tls_key) and a bearer token (server.auth_token_env)")


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


class Gateway(pb_grpc.PDServeServicer):
    def __init__(self, cluster, opts: ServerOptions, metrics: Metrics):
        cfg = cluster.model_config
        self.cluster, self.opts, self.metrics = cluster, opts, metrics
        self.codec = Codec(cluster.tokenizer, cfg.vocab_size, cfg.eos_token_id if cluster.tokenizer is None
                           else cluster.tokenizer.eos_token_id)
        self.limits = Limits(cfg.name, cfg.vocab_size, cfg.max_seq_len, opts.max_prompt_tokens, opts.max_tokens_limit)
        self.pool = ThreadPoolExecutor(max_workers=opts.max_streams + 16, thread_name_prefix="pdserve-gw")
        self.live: set[str] = set()
        self._ids = itertools.count()
        self._lock = threading.Lock()

    # -- RPCs ------------------------------------------------------------------------------------
    async def Generate(self, request, context):
        async for r in self._serve(request, context, chat=False):
            yield r

    async def Chat(self, request, context):
        async for r in self._serve(request, context, chat=True):
            yield r

    async def ListModels(self, request, context):
        cfg = self.cluster.model_config
        return pb.ListModelsResponse(models=[pb.ModelInfo(
            name=cfg.name, quant=cfg.quant.tag, block_size=cfg.block_size, max_seq_len=cfg.max_seq_len,
            vocab_size=cfg.vocab_size, has_chat_template=self.codec.has_chat_template)])

    async def ClusterStatus(self, request, context):
        try:
            s = await self._call(self.cluster.status)
        except Exception:  # noqa: BLE001 - the text of a cluster exception is not for clients
            await context.abort(grpc.StatusCode.UNAVAILABLE, "cluster status unavailable right now; retry")
        self.metrics.update_cluster(s)
        return status_message(self.cluster.model_config.name, s)

    # -- one stream ------------------------------------------------------------------------------
    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def _serve(self, request, context, chat: bool):
        t0 = time.perf_counter()
        try:
            req = prepare(request, self.limits, self.codec, chat)
        except FieldError as e:
            code = grpc.StatusCode.NOT_FOUND if e.not_found else grpc.StatusCode.INVALID_ARGUMENT
            self.metrics.errors.labels(self.limits.model, code.name).inc()
            await context.abort(code, str(e))
        rid = await self._admit(req, context)
        state = {"cluster_done": False}  # True once the cluster holds nothing more for this request
        self.metrics.in_gateway.labels(self.limits.model).inc()
        try:
            try:
                sub = await self._call(lambda: self.cluster.submit(
                    req.prompt, req.params, req.session_id, rid, req.ttft_s, req.tbt_s, req.priority))
            except Rejected as e:
                state["cluster_done"] = True
                self.metrics.rejected.labels(self.limits.model).inc()
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"rejected: {e.reason}")
            except Exception as e:  # noqa: BLE001 - a status of ours, never the exception's text
                state["cluster_done"] = True
                code, message = client_message(e)
                self.metrics.errors.labels(self.limits.model, code).inc()
                await context.abort(grpc.StatusCode[code], message)
            async for r in self._pump(rid, sub, req, context, t0, state):
                yield r
        finally:  # cancel, deadline, stop string, error: free what the request holds in the cluster
            self.metrics.in_gateway.labels(self.limits.model).dec()
            if not state["cluster_done"]:
                self.pool.submit(self.cluster.cancel, rid)
            self._forget(rid)

    async def _admit(self, req: Prepared, context) -> str:
        with self._lock:
            if len(self.live) >= self.opts.max_streams:
                code, msg = grpc.StatusCode.RESOURCE_EXHAUSTED, f"gateway: {self.opts.max_streams} streams already open"
            elif req.request_id and req.request_id in self.live:
                code, msg = grpc.StatusCode.ALREADY_EXISTS, f"request_id: {req.request_id!r} is in flight"
            else:
                rid = req.request_id or f"gw-{next(self._ids)}"
                self.live.add(rid)
                return rid
        await context.abort(code, msg)

    def _forget(self, rid: str) -> None:
        with self._lock:
            self.live.discard(rid)

    async def _pump(self, rid: str, sub, req: Prepared, context, t0: float, state: dict):
        loop, q = asyncio.get_running_loop(), asyncio.Queue()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the loop is gone (server stopping)
                pass

        def pump() -> None:
            try:
                for out in self.cluster.stream(sub):
                    put(out)
            except BaseException as e:  # noqa: BLE001 - handed to the event loop as a status
                put(e)
            put(None)

        self.pool.submit(pump)
        detok, stops = Detokenizer(self.codec), StopMatcher(req.stop)
        times, n, reason = [], 0, None
        while reason is None:
            item = await q.get()
            if item is None:
                await context.abort(grpc.StatusCode.INTERNAL, "the cluster ended the stream without a final message")
            if isinstance(item, BaseException):
                code, message = client_message(item)
                self.metrics.errors.labels(self.limits.model, code).inc()
                await context.abort(grpc.StatusCode[code], f"request {rid}: {message}")
            state["cluster_done"] = item.finished
            if item.finish_reason and item.finish_reason.startswith("error"):
                self.metrics.errors.labels(self.limits.model, "INTERNAL").inc()
                await context.abort(grpc.StatusCode.INTERNAL, f"request {rid}: {item.finish_reason}")
            if item.finish_reason == "abort":
                await context.abort(grpc.StatusCode.ABORTED, f"request {rid} was aborted by the cluster")
            if item.token_ids:
                times.extend([time.perf_counter()] * len(item.token_ids))
                n += len(item.token_ids)
                text, hit = stops.feed(detok.add(item.token_ids))
                reason = "stop" if hit else None
                yield pb.GenerateResponse(request_id=rid, text=text, token_ids=item.token_ids)
            if item.finished and reason is None:
                reason = item.finish_reason or "stop"
                tail = stops.feed(detok.flush())[0] + stops.flush()
                if tail:
                    yield pb.GenerateResponse(request_id=rid, text=tail)
        if not state["cluster_done"]:  # a stop string ended it early: free the cluster before the final message
            state["cluster_done"] = True
            await self._call(self.cluster.cancel, rid)
        yield self._final(rid, sub, req, reason, times, n, t0)

    def _final(self, rid: str, sub, req: Prepared, reason: str, times: list[float], n: int, t0: float):
        end = time.perf_counter()
        handoff = sub.handoff.result() if sub.handoff.done() and not sub.handoff.exception() else None
        cached = handoff.cached_tokens if handoff is not None else 0
        ttft = times[0] - t0 if times else None
        gaps = sorted(b - a for a, b in zip(times, times[1:]) if b > a)
        worked = sum(handoff.timings.values()) if handoff is not None else 0.0
        self.metrics.finished(reason, ttft, gaps, end - t0, len(req.prompt), cached, n)
        return pb.GenerateResponse(
            request_id=rid, finished=True, finish_reason=reason,
            usage=pb.Usage(prompt_tokens=len(req.prompt), cached_tokens=cached, completion_tokens=n),
            timings=pb.Timings(queue_s=max(0.0, (ttft or 0.0) - worked), ttft_s=ttft or 0.0,
                               mean_tbt_s=sum(gaps) / len(gaps) if gaps else 0.0,
                               p99_tbt_s=gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))] if gaps else 0.0,
                               e2e_s=end - t0))


def status_message(model: str, s: dict) -> pb.ClusterStatusResponse:
    workers = [pb.WorkerStatus(name=name, role=w.get("role") or ("decode" if "running" in w else "prefill"),
                               running=w.get("running", 1 if w.get("queued_tokens") else 0),
                               waiting=w.get("waiting", 0), free_blocks=_total(w.get("free_blocks", 0)),
                               capacity_blocks=_total(w.get("capacity", 0)), device=w.get("device", ""),
                               gpu_ids=w.get("gpu_ids", []), state=w.get("state", "alive"),
                               restarts=int(w.get("restarts", 0)))
               for name, w in s.get("workers", {}).items()]
    store, counters = s.get("store", {}), s.get("counters", {})
    tiers = [pb.TierStatus(tier=t, blocks=store.get("blocks", {}).get(t, 0), bytes=store.get("bytes", {}).get(t, 0),
                           hit_tokens=store.get("hit_tokens", {}).get(t, 0)) for t in ("host", "disk")]
    return pb.ClusterStatusResponse(
        model=model, policy=str(s.get("policy", "")), workers=workers, tiers=tiers,
        live_leases=store.get("live_leases", 0), predicted_hit_tokens=int(s.get("predicted_hit_tokens", 0)),
        delivered_hit_tokens=int(s.get("delivered_hit_tokens", 0)), requests=int(s.get("requests", 0)),
        rejected=int(s.get("rejected", 0)), in_flight=int(s.get("in_flight", 0)),
        bytes_transferred=store.get("bytes_in", 0) + store.get("bytes_out", 0), serving=bool(s.get("serving", True)),
        store_state=store.get("state", "alive"), store_restarts=int(store.get("restarts", 0)),
        migrations=int(counters.get("migrations", 0)), recomputed_tokens=int(counters.get("recomputed_tokens", 0)),
        kv_load_failures=int(counters.get("kv_load_failures", 0)))


def _total(v) -> int:
    """Free/capacity blocks come per KV group (a dict or list) or as one number."""
    if isinstance(v, dict):
        return int(sum(v.values()))
    if isinstance(v, (list, tuple)):
        return int(sum(v))
    return int(v)


class BearerAuth(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on every RPC but health checks."""

    def __init__(self, token: str):
        self.expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        if details.method.startswith("/grpc.health.v1.Health/"):
            return await continuation(details)
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(got.encode() if isinstance(got, str) else got, self.expected):
            return await continuation(details)

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "authorization: a valid bearer token is required")

        return grpc.unary_unary_rpc_method_handler(deny)


@dataclass
class Running:
    server: grpc.aio.Server
    port: int
    gateway: Gateway
    health: object  # grpc_health.v1.health.aio.HealthServicer
    watcher: asyncio.Task | None = None

    async def stop(self, grace: float = 5.0) -> None:
        if self.watcher is not None:
            self.watcher.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        self.gateway.pool.shutdown(wait=False, cancel_futures=True)


async def start(cluster, opts: ServerOptions, metrics: Metrics) -> Running:
    """Builds, binds and starts the server; returns it with its bound port."""
    check_exposure(opts)
    options = [("grpc.max_receive_message_length", opts.max_message_bytes),
               ("grpc.max_send_message_length", opts.max_message_bytes)]
    interceptors = [BearerAuth(opts.auth_token)] if opts.auth_token else []
    server = grpc.aio.server(options=options, interceptors=interceptors)
    gateway = Gateway(cluster, opts, metrics)
    pb_grpc.add_PDServeServicer_to_server(gateway, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{opts.host}:{opts.port}"
    if opts.tls_cert:
        with open(opts.tls_key, "rb") as k, open(opts.tls_cert, "rb") as c:
            creds = grpc.ssl_server_credentials([(k.read(), c.read())])
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    await server.start()
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    watcher = asyncio.create_task(watch_health(cluster, health_servicer)) if hasattr(cluster, "serving") else None
    return Running(server, port, gateway, health_servicer, watcher)


async def watch_health(cluster, servicer, every_s: float = 0.25) -> None:
    """Health follows the cluster: NOT_SERVING while it cannot serve (``cluster.serving()`` reads the
    supervisor's view, no Ray call), SERVING once it can again."""
    last = True
    while True:
        try:
            now = bool(cluster.serving())
        except Exception:  # noqa: BLE001 - a cluster that cannot even say is not serving
            now = False
        if now != last:
            status = health_pb2.HealthCheckResponse.SERVING if now else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ("", SERVICE):
                await servicer.set(name, status)
            last = now
        await asyncio.sleep(every_s)
