"""A pdserve cluster: Ray on 127.0.0.1 (or a Ray cluster of many nodes), a KV store per node, N
prefill and M decode workers.

Used by the tests and the CLI. Each request is placed by the Conductor (``scheduler.conductor``)
with a policy object (``scheduler.policies``, the same ones the simulator runs), prefilled on one
worker, handed to a decode worker through the store, and streamed back (``pdserve.driver``, which
also moves a request whose worker is lost). Workers and the store are restartable Ray actors
(``pdserve.actors``); ``pdserve.supervisor`` watches them and keeps the Conductor's placement to
the live ones. ``kill``, ``arm_fault`` and ``corrupt_block`` inject faults (tests, ``pdserve chaos``).

With a ``topology`` (``pdserve.topology``) the workers and one store per node are pinned to named Ray
nodes; each worker reads its own node's store first, another node's through Ray (``pdserve.nodes``),
and a node that leaves the Ray cluster is forgotten while the rest keeps serving.

Workers can hold a Ray GPU share each (``prefill_num_gpus`` / ``decode_num_gpus``; 0.5 and 0.5
pack a prefill and a decode worker on one GPU). Each worker picks its device inside its own
process, where Ray has made its assigned GPUs visible: the driver makes no CUDA call.
"""
from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from kvstore.blocks import BlockSpec
from kvstore.handoff import WorkerInfo, handshake
from kvstore.index import KVLayout
from kvstore.keys import fingerprint_of
from kvstore.store import StoreConfig
from model.config import QuantConfig
from model.engine import EngineConfig
from model.loader import load
from pdserve.actors import DecodeActor, PrefillActor, ResourceError, spawn, worker_device  # noqa: F401 (re-exported)
from pdserve.config import Resilience, check_gpu_keys
from pdserve.driver import Counters, RequestFlow, Rejected, Submitted  # noqa: F401 (re-exported)
from pdserve.nodes import NodeParts
from pdserve.supervisor import Member, Supervisor
from pdserve.topology import PlacedNode, Topology, pinned, resolve
from scheduler.conductor import Conductor
from scheduler.cost_model import CPU_FALLBACK, live_cost_model, with_kv_of
from scheduler.policies import SLO, make_policy
from scheduler.replication import HotBlockReplication


GPU_UNITS = 10_000  # Ray counts resources in fixed point, 1/10000 of a unit


def gpus_needed(shares: list[float]) -> int:
    """The GPUs that hold these per-worker shares, packed largest first with each GPU holding
    shares summing to at most one (a worker never spans GPUs); counted in Ray's fixed point so
    that 0.1 x 10 fills exactly one GPU."""
    free: list[int] = []  # room left on each GPU taken so far
    for units in sorted((round(s * GPU_UNITS) for s in shares if s > 0), reverse=True):
        gpu = next((i for i, room in enumerate(free) if room >= units), None)
        if gpu is None:
            free.append(GPU_UNITS - units)
        else:
            free[gpu] -= units
    return len(free)


def check_gpu_capacity(n_prefill: int, prefill_num_gpus: float, n_decode: int, decode_num_gpus: float,
                       have: float) -> None:
    """Refuses GPU shares the Ray cluster cannot hold, before any actor asks for them: Ray would
    leave such actors pending forever, a hang rather than an error."""
    need = gpus_needed([prefill_num_gpus] * n_prefill + [decode_num_gpus] * n_decode)
    if need > have:
        raise ResourceError(f"{n_prefill} prefill worker(s) x cluster.prefill_num_gpus = {prefill_num_gpus:g} and "
                            f"{n_decode} decode worker(s) x cluster.decode_num_gpus = {decode_num_gpus:g} fill {need} "
                            f"GPU(s), but the Ray cluster has {have:g}: lower those shares or cluster.n_prefill / "
                            "cluster.n_decode, or (a local Ray) declare GPUs with cluster.num_gpus")


class LocalCluster(RequestFlow, NodeParts):
    def __init__(self, model: str = "skv-tiny", quant: QuantConfig | None = None, n_prefill: int = 1,
                 n_decode: int = 1, engine_config: EngineConfig = EngineConfig(),
                 store_config: StoreConfig = StoreConfig(), num_cpus: int | None = None,
                 policy: str = "cache_aware", cost_model: str | None = None, slo: SLO = SLO(),
                 device: str = "auto", prefill_num_gpus: float = 0.0, decode_num_gpus: float = 0.0,
                 num_gpus: int | None = None, resilience: Resilience = Resilience(),
                 topology: Topology | None = None, replication_threshold: int = 4, cost_correction: bool = True):
        if quant is not None and not quant.kv:
            raise ValueError("the cluster ships int8 KV between workers: use an int8 KV precision "
                             f"(got {quant.tag}); float runs need the single-process engine")
        check_gpu_keys(device, prefill_num_gpus, decode_num_gpus)
        self.cost_model = live_cost_model(model, cost_model)  # before Ray: a bad name fails fast
        self.policy = make_policy(policy, self.cost_model, slo)
        self.cost_correction = cost_correction  # the Conductor scales predictions by observed speeds
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray binds 127.0.0.1 only
        import ray

        self.ray = ray
        self.owns_ray = not ray.is_initialized()
        if self.owns_ray:  # "local": a Ray of our own, even where `ray start` left its address in /tmp/ray
            ray.init(address="local", num_cpus=num_cpus or max(2, os.cpu_count() or 2), num_gpus=num_gpus,
                     include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        self.prefill: dict = {}
        self.decode: dict = {}
        self.store = None
        self.stores: dict = {}
        self.node_of: dict[str, str] = {}
        self.supervisor = None
        self.topology, self.replication_threshold = topology, replication_threshold
        self.resilience = resilience
        self.counters = Counters()
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._live: dict = {}
        self._cancelled: set[str] = set()
        self._pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="pdserve-submit")
        try:
            placed = resolve(topology, ray.nodes()) if topology is not None and topology.multi_node else None
            if placed is not None:
                n_prefill, n_decode = sum(p.n_prefill for p in placed), sum(p.n_decode for p in placed)
                self.policy.remote_fetch = True  # a prefix on another node may be fetched, not recomputed
            self.placed = placed
            check_gpu_capacity(n_prefill, prefill_num_gpus, n_decode, decode_num_gpus,
                               ray.cluster_resources().get("GPU", 0.0))
            self._start(model, quant, n_prefill, n_decode, engine_config, store_config, device,
                        prefill_num_gpus, decode_num_gpus)
        except BaseException:
            self.shutdown()  # what started so far, and our own Ray
            raise

    def _start(self, model: str, quant: QuantConfig | None, n_prefill: int, n_decode: int,
               engine_config: EngineConfig, store_config: StoreConfig, device: str, prefill_num_gpus: float,
               decode_num_gpus: float) -> None:
        """The store and the workers, paired by handshake, and the Conductor that places requests."""
        ray = self.ray
        loaded = load(model, quant=quant)
        self.tokenizer = loaded.tokenizer
        self.model_config = loaded.model.config
        self.fingerprint = fingerprint_of(loaded.model)
        del loaded
        cfg = self.model_config
        if self.cost_model.name == CPU_FALLBACK.name:  # its timings are guesses, the KV sizes need not be
            self.cost_model = self.policy.cost = with_kv_of(self.cost_model, cfg)
        self._start_stores(self.placed, BlockSpec.of(cfg), self.fingerprint, KVLayout.of(cfg), store_config)
        opts = {"store_timeout_s": self.resilience.store_timeout_s, "kv_load_failure": self.resilience.kv_load_failure}
        role_opts = {"prefill": opts, "decode": {**opts, "keepalive_s": min(2.0, self.resilience.stall_timeout_s / 4)}}
        for role, name, node, cpus in _worker_plan(self.placed, n_prefill, n_decode):
            if node is not None:
                self.node_of[name] = node
            args = (model, quant, self._store_of(name), self.fingerprint, engine_config, device)
            where = {} if node is None else pinned(self.node_ids[node])
            if role == "prefill":
                self.prefill[name] = spawn(PrefillActor, name, args, role_opts["prefill"], num_cpus=cpus,
                                           num_gpus=prefill_num_gpus, max_concurrency=64, **where)  # calls batch
            else:
                self.decode[name] = spawn(DecodeActor, name, args, role_opts["decode"], num_cpus=cpus,
                                          num_gpus=decode_num_gpus, max_concurrency=256, **where)
        actors = {**self.prefill, **self.decode}
        try:
            infos = ray.get([a.start.remote(name, model, quant, self._store_of(name), self.fingerprint, engine_config,
                                            device, **role_opts["prefill" if name in self.prefill else "decode"])
                             for name, a in actors.items()])
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, ResourceError):
                raise e.cause from None  # the worker's own message, without Ray's traceback around it
            raise
        self.workers: dict[str, WorkerInfo] = dict(zip(actors, infos))
        for p in infos[:n_prefill]:
            for d in infos[n_prefill:]:
                handshake(p, d)
        replication = HotBlockReplication(self.replication_threshold, cfg.block_size) if self.node_of else None
        self.conductor = Conductor(self.policy, self.cost_model, list(self.prefill), list(self.decode),
                                   cfg.block_size, self.fingerprint, nodes=self.node_of, replication=replication,
                                   correct=self.cost_correction)
        members = [Member(n, "prefill", a) for n, a in self.prefill.items()]
        members += [Member(n, "decode", a) for n, a in self.decode.items()]
        members += [Member(n, "store", a) for n, a in self._store_members().items()]
        self._watch_nodes()
        self.supervisor = Supervisor(members, self.conductor.mark_down, self._rejoin, self._store_reset,
                                     unresponsive_s=self.resilience.unresponsive_s,
                                     stuck_s=self.resilience.stall_timeout_s,
                                     on_round=self.node_watch.check if self.node_watch else None,
                                     on_report=self.conductor.observe_load).start()

    def _rejoin(self, member: Member) -> bool:
        """A worker answers again (maybe restarted): it must still pair with the others (handshake)
        before it goes back into placement."""
        info = member.load.get("info")
        if info is not None:
            for other in self.workers.values():
                if other.role != info.role:
                    try:
                        handshake(info, other)
                    except ValueError:
                        return False
            self.workers[member.name] = info
        self.conductor.mark_up(member.name)
        return True

    def _store_reset(self, name: str = "store") -> None:
        """A store came back empty: nobody holds its blocks now."""
        self.counters.add(store_resets=1)
        self.conductor.forget_blocks(name.partition("@")[2] or None)

    # -- health and fault injection --------------------------------------------------------------------
    def serving(self) -> bool:
        """Whether the cluster can serve a request now: a live prefill and a live decode worker."""
        return bool(self.supervisor.live("prefill")) and bool(self.supervisor.live("decode"))

    def actor(self, name: str):
        """The Ray actor behind a worker name ("prefill-0", "decode-1") or "store"."""
        handles = {**self.prefill, **self.decode, "store": self.store, **self._store_members()}
        if name not in handles:
            raise ValueError(f"unknown cluster member {name!r}; members: {', '.join(handles)}")
        return handles[name]

    def kill(self, name: str, restart: bool = True) -> None:
        """Kill a worker or the store now, as a crash would (Ray restarts it unless ``restart`` is off)."""
        self.ray.kill(self.actor(name), no_restart=not restart)

    def arm_fault(self, name: str, point: str, action: str = "exit", after: int = 0, times: int = 1,
                  seconds: float = 0.0) -> None:
        """Arm a fault in a worker or the store: at ``point`` ("decode.step", "decode.publish",
        "prefill.compute", "prefill.step", "prefill.reply", "kv.fetch"; the store's "store.put", "store.get"), after ``after`` passing
        hits, ``exit`` (the process dies), ``raise`` or ``delay``."""
        self.ray.get(self.actor(name).arm_fault.remote(point, action, after, times, seconds), timeout=30)

    def corrupt_block(self, key: int) -> bool:
        """Damage a stored block's bytes (its checksum stays): readers must detect it and recompute."""
        return self.ray.get(self.store.corrupt.remote(key), timeout=30)

    def store_stats(self) -> dict:
        return self.ray.get(self.store.snapshot.remote(), timeout=self.resilience.store_timeout_s)

    def loads(self, timeout_s: float = 5.0) -> dict[str, dict]:
        """Each worker's load report, fresh; a worker that does not answer in time has none (its state
        is in ``status()``)."""
        actors = {**self.prefill, **self.decode}
        refs = {name: a.load.remote() for name, a in actors.items()}
        self.ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        out = {}
        for name, ref in refs.items():
            try:
                out[name] = self.ray.get(ref, timeout=0)
            except Exception:  # noqa: BLE001 - dead, restarting or busy: no report
                pass
        return out

    def status(self) -> dict:
        """The cluster at a glance (the gateway serves it): each worker's state (alive, restarting,
        dead), restarts, load, device, GPU ids, node and speed against the cost model (``slowdown``; a
        prefill worker's fetches from other nodes' stores, ``transfer_slowdown``); store stats (the first
        node's); per node, its state, store and workers (``nodes``); the policy; the Conductor's predicted
        vs delivered cache hits (design invariant 5), the part placed to be fetched from another node and
        the blocks replicated; failure counters. Never raises for a dead part."""
        loads = self.loads(timeout_s=2.0)
        self.conductor.update_loads(loads)
        self._drain_store_events()
        stats, slowdowns = self.conductor.stats(), self.conductor.slowdowns()
        fetches = self.conductor.transfer_slowdowns()
        health = self.supervisor.snapshot()
        workers = {}
        for name in [*self.prefill, *self.decode]:
            h = health[name]
            load = loads.get(name) or {k: v for k, v in h["load"].items() if k != "info"}
            if h["state"] not in ("alive", "stuck"):  # its batch is gone: no stale numbers in the gauges
                load = {k: v for k, v in load.items() if k not in ("running", "waiting", "queued_tokens")}
            info = self.workers[name]
            workers[name] = {**load, "role": h["role"], "state": h["state"], "restarts": h["restarts"],
                             "device": info.device, "gpu_ids": list(info.gpu_ids), "slowdown": slowdowns.get(name, 1.0)}
            if name in fetches:  # a prefill worker: how its fetches from other nodes' stores compare with the model
                workers[name]["transfer_slowdown"] = fetches[name]
        try:
            store = self.store_stats()
        except Exception:  # noqa: BLE001
            store = {}
        first = next(iter(self._store_members()))
        store.update(state=health[first]["state"], restarts=health[first]["restarts"])
        for name, w in workers.items():
            w["node"] = self.node_of.get(name, "")
        return {"workers": workers, "store": store, "nodes": self.node_status(health, workers),
                "policy": stats["policy"], "remote_hit_tokens": stats["remote_hit_tokens"],
                "replicated_blocks": stats["replicated_blocks"],
                "cost_model": self.cost_model.name, "ttft_observed_over_predicted": stats["ttft_observed_over_predicted"],
                "predicted_hit_tokens": stats["predicted_hit_tokens"],
                "delivered_hit_tokens": stats["delivered_hit_tokens"],
                "delivered_partial_tokens": stats["delivered_partial_tokens"], "requests": stats["requests"],
                "rejected": stats["rejected"], "in_flight": stats["in_flight"], "serving": self.serving(),
                "counters": {**self.counters.snapshot(),
                             "restarts": sum(h["restarts"] for h in health.values() if h["role"] != "store")}}

    def shutdown(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)
        for a in [*self.prefill.values(), *self.decode.values()]:
            try:
                self.ray.get(a.shutdown.remote(), timeout=10)
            except Exception:
                pass
        for a in [*self.prefill.values(), *self.decode.values(), *self.stores.values()]:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - its node is gone already
                pass
        if self.owns_ray:
            self.ray.shutdown()

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _worker_plan(placed: list[PlacedNode] | None, n_prefill: int, n_decode: int):
    """(role, name, node or None, CPU share) of each worker: numbered across the cluster, the CPU
    shares of one node's workers summing to one."""
    if placed is None:
        frac = 1.0 / (n_prefill + n_decode)
        yield from (("prefill", f"prefill-{i}", None, frac) for i in range(n_prefill))
        yield from (("decode", f"decode-{i}", None, frac) for i in range(n_decode))
        return
    i = j = 0
    for node in placed:
        frac = 1.0 / max(1, node.n_prefill + node.n_decode)
        for _ in range(node.n_prefill):
            yield "prefill", f"prefill-{i}", node.name, frac
            i += 1
        for _ in range(node.n_decode):
            yield "decode", f"decode-{j}", node.name, frac
            j += 1
