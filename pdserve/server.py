"""One pdserve server process: a LocalCluster (Ray on 127.0.0.1, or joined to ``--address``), the
gRPC gateway and the metrics endpoint, until SIGTERM/SIGINT. ``pdserve up`` runs it; the state
file it writes is how ``down``, ``status`` and the clients find it."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pdserve.config import Config

DEFAULT_STATE = Path(os.environ.get("PDSERVE_STATE", "~/.pdserve/server.json")).expanduser()


@dataclass
class ServerState:
    pid: int
    target: str  # host:port of the gRPC server
    metrics_port: int
    model: str
    log: str = ""
    ray_address: str = ""
    started: float = 0.0
    tls: bool = False
    http_port: int = -1  # the OpenAI HTTP API and dashboard, on the gRPC target's host; -1 = off

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "ServerState | None":
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            return None


def build_cluster(cfg: Config, ray_address: str | None):
    """A LocalCluster from the config; joins a running Ray cluster when an address is given."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray: bind 127.0.0.1 only
    if ray_address:
        prefer_token_auth()  # before anything below imports Ray
    from kvstore.store import StoreConfig
    from model.engine import EngineConfig
    from pdserve.cluster import LocalCluster
    from scheduler.policies import SLO

    if ray_address:
        join_ray(ray_address)
    c = cfg.cluster
    store = StoreConfig(host_capacity_blocks=cfg.store.host_capacity_blocks,
                        disk_capacity_blocks=cfg.store.disk_capacity_blocks, disk_dir=cfg.store.disk_dir or None)
    cluster = LocalCluster(c.model, n_prefill=c.n_prefill, n_decode=c.n_decode,
                           engine_config=EngineConfig(kv_cache_bytes=c.kv_cache_bytes, max_seqs=c.max_seqs),
                           store_config=store, num_cpus=c.num_cpus or None, policy=c.policy,
                           cost_correction=c.cost_correction,
                           slo=SLO(ttft_s=cfg.slo.ttft_ms / 1000, tbt_s=cfg.slo.tbt_ms / 1000), device=c.device,
                           prefill_num_gpus=c.prefill_num_gpus, decode_num_gpus=c.decode_num_gpus,
                           num_gpus=c.num_gpus or None, resilience=cfg.resilience,
                           topology=cfg.topology.to_topology(),  # None: one node (issue 17)
                           replication_threshold=cfg.topology.replication_threshold)
    if c.block_size and c.block_size != cluster.model_config.block_size:
        cluster.shutdown()
        raise ValueError(f"config key cluster.block_size={c.block_size} differs from model {c.model!r}'s "
                         f"block size {cluster.model_config.block_size}")
    return cluster


def prefer_token_auth() -> None:
    """`ray start` turns on Ray's token authentication by default, and a joining driver sends its
    token only in token mode, so that mode is chosen whenever a token is at hand (a cluster without
    auth accepts it too). Ray fixes the mode once it is imported, so this must run before any module
    that imports Ray (``build_cluster`` calls it first)."""
    token_at_hand = os.environ.get("RAY_AUTH_TOKEN") or Path(
        os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").is_file()
    if "RAY_AUTH_MODE" not in os.environ and token_at_hand:
        os.environ["RAY_AUTH_MODE"] = "token"


def join_ray(address: str) -> None:
    """Connects this driver to an operator's Ray cluster (token mode where a token is at hand)."""
    prefer_token_auth()
    import ray

    try:
        ray.init(address=address, log_to_driver=False)
    except ConnectionError as e:
        raise ConnectionError(f"--address {address}: could not join the Ray cluster ({e}); check the address "
                              "printed by `ray start --head` and, if the cluster uses token authentication, "
                              "that RAY_AUTH_TOKEN or ~/.ray/auth_token holds its token") from e


def server_options(cfg: Config):
    from pdserve.gateway import ServerOptions

    s = cfg.server
    token = os.environ.get(s.auth_token_env, "") if s.auth_token_env else ""
    if s.auth_token_env and not token:
        raise ValueError(f"config key server.auth_token_env names {s.auth_token_env!r}, which is unset or empty")
    return ServerOptions(host=s.host, port=s.port, max_message_bytes=s.max_message_bytes,
                         max_prompt_tokens=s.max_prompt_tokens, max_tokens_limit=s.max_tokens_limit,
                         tls_cert=s.tls_cert, tls_key=s.tls_key, auth_token=token)


async def serve(cfg: Config, ray_address: str | None, state_file: Path | None, log: str = "") -> None:
    """Runs until SIGTERM or SIGINT, then stops the gateway and the cluster it started."""
    from pdserve.gateway import check_exposure, start
    from pdserve.http_edge import start_http
    from pdserve.metrics import Metrics

    opts = server_options(cfg)
    check_exposure(opts)  # before the minutes a cluster takes to start
    cluster = await asyncio.to_thread(build_cluster, cfg, ray_address)
    running = http = None
    try:
        metrics = Metrics(cluster.model_config.name)
        metrics_port = metrics.serve_http(cfg.server.metrics_port) if cfg.server.metrics_port >= 0 else -1
        running = await start(cluster, opts, metrics)
        if cfg.server.http_port >= 0:  # same process and event loop, same front door as gRPC
            capacity = {"host": cfg.store.host_capacity_blocks, "disk": cfg.store.disk_capacity_blocks}
            http = await start_http(running.gateway.door, opts, cfg.server.http_port, capacity)
        refresher = asyncio.create_task(_refresh(cluster, metrics))
        host = opts.host if opts.host not in ("0.0.0.0", "::", "[::]") else "127.0.0.1"
        state = ServerState(os.getpid(), f"{host}:{running.port}", metrics_port, cluster.model_config.name, log,
                            ray_address or "", time.time(), bool(opts.tls_cert), http.port if http else -1)
        if state_file is not None:
            state.save(state_file)
        print(f"pdserve: serving {state.model} on {state.target} (metrics :{metrics_port}, HTTP :{state.http_port})",
              flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        refresher.cancel()
    finally:
        if http is not None:
            await http.stop()
        if running is not None:
            await running.stop(grace=3.0)
        await asyncio.to_thread(cluster.shutdown)
        if state_file is not None and (ServerState.load(state_file) or ServerState(0, "", 0, "")).pid == os.getpid():
            state_file.unlink(missing_ok=True)
        print("pdserve: stopped", flush=True)


async def _refresh(cluster, metrics, every_s: float = 2.0) -> None:
    """Keeps the cluster gauges of the metrics endpoint current (``status()`` answers for dead
    workers too, so a failure shows within a refresh)."""
    while True:
        try:
            metrics.update_cluster(await asyncio.to_thread(cluster.status))
        except Exception:  # a scrape gauge going stale must never take the server down
            pass
        await asyncio.sleep(every_s)
