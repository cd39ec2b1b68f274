"""The gRPC front door (``pdserve.v1``, grpc.aio) in front of a LocalCluster.

Validation, admission, placement, the token stream and cancellation live in ``pdserve.frontdoor``,
shared with the OpenAI HTTP edge (``pdserve.http_edge``). Every accepted request ends in a final
message or an explicit status; a stream that ends early (client cancel, deadline, stop string, error)
cancels the request in the cluster, which frees its slots, blocks and leases.

What a client reads on a failure is a status code and a short message of ours (``pdserve.errors``),
never an exception's own text. The health service follows the cluster: NOT_SERVING while it has no
live prefill or no live decode worker, SERVING again once it has.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdserve.frontdoor import (Final, FrontDoor, Refused, ServerOptions, StopMatcher, total_blocks,  # noqa: F401 (re-exported)
                               check_exposure, is_loopback)
from pdserve.metrics import Metrics
from protos.pdserve.v1 import pdserve_pb2 as pb
from protos.pdserve.v1 import pdserve_pb2_grpc as pb_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["PDServe"].full_name


class Gateway(pb_grpc.PDServeServicer):
    """pdserve.v1 over the transport-neutral front door (``pdserve.frontdoor``), which the OpenAI HTTP
    edge shares: this class only maps its requests, events and refusals to protobuf and gRPC codes."""

    def __init__(self, cluster, opts: ServerOptions, metrics: Metrics, door: FrontDoor | None = None):
        self.door = door or FrontDoor(cluster, opts, metrics)
        self.cluster, self.opts, self.metrics = cluster, opts, metrics
        self.codec, self.limits, self.pool = self.door.codec, self.door.limits, self.door.pool

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
            s = await self.door.call(self.cluster.status)
        except Exception:  # noqa: BLE001 - the text of a cluster exception is not for clients
            await context.abort(grpc.StatusCode.UNAVAILABLE, "cluster status unavailable right now; retry")
        self.metrics.update_cluster(s)
        return status_message(self.cluster.model_config.name, s)

    # -- one stream ------------------------------------------------------------------------------
    async def _serve(self, request, context, chat: bool):
        t0 = time.perf_counter()
        try:
            req = await self.door.prepare(request, chat)
            stream = await self.door.open(req, t0)
        except Refused as e:
            if e.rejected:  # gRPC's retry pushback: when the Conductor would predict admission
                context.set_trailing_metadata((("grpc-retry-pushback-ms", str(1000 * e.retry_after())),))
            await context.abort(grpc.StatusCode[e.code], e.message)
        async with contextlib.aclosing(self.door.events(stream)) as events:
            try:
                async for e in events:
                    if isinstance(e, Final):
                        yield final_message(e)
                    else:
                        yield pb.GenerateResponse(request_id=stream.rid, text=e.text, token_ids=e.token_ids)
            except Refused as e:
                await context.abort(grpc.StatusCode[e.code], e.message)


def final_message(f: Final) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        request_id=f.request_id, finished=True, finish_reason=f.reason,
        usage=pb.Usage(prompt_tokens=f.prompt_tokens, cached_tokens=f.cached_tokens,
                       completion_tokens=f.completion_tokens),
        timings=pb.Timings(queue_s=f.queue_s, ttft_s=f.ttft_s, mean_tbt_s=f.mean_tbt_s, p99_tbt_s=f.p99_tbt_s,
                           e2e_s=f.e2e_s))


def status_message(model: str, s: dict) -> pb.ClusterStatusResponse:
    workers = [pb.WorkerStatus(name=name, role=w.get("role") or ("decode" if "running" in w else "prefill"),
                               running=w.get("running", 1 if w.get("queued_tokens") else 0),
                               waiting=w.get("waiting", 0), free_blocks=total_blocks(w.get("free_blocks", 0)),
                               capacity_blocks=total_blocks(w.get("capacity", 0)), device=w.get("device", ""),
                               gpu_ids=w.get("gpu_ids", []), state=w.get("state", "alive"),
                               restarts=int(w.get("restarts", 0)), node=w.get("node", ""),
                               step_s=float(w.get("busy_s", 0.0)), slowdown=float(w.get("slowdown", 1.0)),
                               transfer_slowdown=float(w.get("transfer_slowdown", 1.0)))
               for name, w in s.get("workers", {}).items()]
    store, counters = s.get("store", {}), s.get("counters", {})
    tiers = [pb.TierStatus(tier=t, blocks=store.get("blocks", {}).get(t, 0), bytes=store.get("bytes", {}).get(t, 0),
                           hit_tokens=store.get("hit_tokens", {}).get(t, 0)) for t in ("host", "disk")]
    return pb.ClusterStatusResponse(
        model=model, policy=str(s.get("policy", "")), workers=workers, tiers=tiers,
        live_leases=store.get("live_leases", 0), predicted_hit_tokens=int(s.get("predicted_hit_tokens", 0)),
        delivered_hit_tokens=int(s.get("delivered_hit_tokens", 0)),
        delivered_partial_tokens=int(s.get("delivered_partial_tokens", 0)), cost_model=str(s.get("cost_model", "")),
        ttft_observed_over_predicted=float(s.get("ttft_observed_over_predicted", 0.0)), requests=int(s.get("requests", 0)),
        rejected=int(s.get("rejected", 0)), in_flight=int(s.get("in_flight", 0)),
        bytes_transferred=store.get("bytes_in", 0) + store.get("bytes_out", 0), serving=bool(s.get("serving", True)),
        store_state=store.get("state", "alive"), store_restarts=int(store.get("restarts", 0)),
        migrations=int(counters.get("migrations", 0)), recomputed_tokens=int(counters.get("recomputed_tokens", 0)),
        kv_load_failures=int(counters.get("kv_load_failures", 0)),
        nodes=[_node_status(name, n) for name, n in s.get("nodes", {}).items()] if len(s.get("nodes", {})) > 1 else [])


def _node_status(name: str, n: dict) -> pb.NodeStatus:
    """One node of a multi-node topology: its state, its store's numbers and its workers."""
    st = n.get("store", {})
    return pb.NodeStatus(name=name, state=n.get("state", "alive"), ray_node_id=n.get("ray_node_id", ""),
                         workers=n.get("workers", []), store_state=st.get("state", "dead" if n.get("state") == "lost"
                                                                          else "alive"),
                         blocks=sum(st.get("blocks", {}).values()), bytes=sum(st.get("bytes", {}).values()),
                         hit_tokens=sum(st.get("hit_tokens", {}).values()),
                         bytes_transferred=st.get("bytes_in", 0) + st.get("bytes_out", 0),
                         replicated_blocks=st.get("replicated_blocks", 0))



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
        self.gateway.door.serving = False
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
    watcher = (asyncio.create_task(watch_health(cluster, health_servicer, gateway.door))
               if hasattr(cluster, "serving") else None)
    return Running(server, port, gateway, health_servicer, watcher)


async def watch_health(cluster, servicer, door: FrontDoor | None = None, every_s: float = 0.25) -> None:
    """Health follows the cluster: NOT_SERVING while it cannot serve (``cluster.serving()`` reads the
    supervisor's view, no Ray call), SERVING once it can again. ``door.serving`` carries the same truth
    to the HTTP edge's /health."""
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
            if door is not None:
                door.serving = now
            last = now
        await asyncio.sleep(every_s)
