"""A local pdserve cluster: Ray on 127.0.0.1, one KV store, N prefill and M decode workers.

Used by the tests and the CLI. Each request is placed by the Conductor (``scheduler.conductor``)
with a policy object (``scheduler.policies``, the same ones the simulator runs), prefilled on one
worker, handed to a decode worker through the store, and streamed back.

Workers can hold a Ray GPU share each (``prefill_num_gpus`` / ``decode_num_gpus``; 0.5 and 0.5
pack a prefill and a decode worker on one GPU). Each worker picks its device inside its own
process, where Ray has made its assigned GPUs visible: the driver makes no CUDA call.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from decode.worker import DecodeWorker
from kvstore.actor import start_store
from kvstore.blocks import BlockSpec
from kvstore.handoff import Handoff, WorkerInfo, handshake
from kvstore.index import KVLayout
from kvstore.keys import fingerprint_of
from kvstore.store import StoreConfig
from model.config import QuantConfig
from model.engine import EngineConfig, RequestOutput, SamplingParams
from model.loader import load
from pdserve.config import check_gpu_keys
from prefill.worker import PrefillWorker
from scheduler.conductor import Conductor
from scheduler.cost_model import live_cost_model
from scheduler.placement import Placement, PlacementRequest, Reject
from scheduler.policies import SLO, make_policy


class ResourceError(ValueError):
    """The workers ask for GPUs or a device the cluster does not have."""


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


def worker_device(device: str, gpu_ids: tuple[str, ...]) -> str:
    """The torch device of a worker, decided inside its Ray process (Ray sets CUDA_VISIBLE_DEVICES
    to the GPUs it assigned, so "cuda" is the worker's first one). ``auto`` means cuda where the
    worker holds a GPU share and torch sees CUDA; asking for cuda where torch sees none is a
    configuration error, reported as one rather than as torch's traceback from the first tensor."""
    if device == "cpu" or (device == "auto" and not gpu_ids):
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if device == "auto":
        return "cpu"
    raise ResourceError(f"config key cluster.device = 'cuda', but torch {torch.__version__} sees no CUDA device "
                        f"on node {os.uname().nodename} (Ray assigned GPU ids {list(gpu_ids)}, CUDA_VISIBLE_DEVICES="
                        f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}); use device = 'auto' or 'cpu' there")


class _RayWorker:
    """What the prefill and decode actors share: loading on their device, reporting their GPUs.

    The work of construction happens in ``start``, a method, because Ray hands the driver only the
    text (with its traceback) of an exception raised in an actor's constructor, while a method's
    exception arrives as itself: a ResourceError stays one."""

    def __init__(self) -> None:
        """Nothing yet: ``start`` builds the worker."""

    def start(self, name: str, model_name: str, quant: QuantConfig | None, store, fingerprint: int,
              engine_config: EngineConfig, device: str) -> WorkerInfo:
        """Loads the model on this worker's device, chosen here because only this process sees the
        GPUs Ray assigned it; returns the worker's info for the handshake."""
        import ray

        self.gpu_ids = tuple(ray.get_runtime_context().get_accelerator_ids().get("GPU", []))
        loaded = load(model_name, quant=quant, device=worker_device(device, self.gpu_ids))
        super().__init__(name, loaded.model, store, fingerprint, engine_config, loaded.tokenizer)
        return self.info()

    def info(self) -> WorkerInfo:
        """The worker's info with the GPU ids that only Ray knows."""
        return dataclasses.replace(super().info(), gpu_ids=self.gpu_ids)


class PrefillActor(_RayWorker, PrefillWorker):
    """A prefill worker in its own Ray process."""


class DecodeActor(_RayWorker, DecodeWorker):
    """A decode worker in its own Ray process (threaded: streams are read while it decodes)."""


class Rejected(RuntimeError):
    """The placement policy refused the request (early rejection); ``reason`` says why."""

    def __init__(self, request_id: str, reason: str):
        super().__init__(f"request {request_id} rejected: {reason}")
        self.request_id, self.reason = request_id, reason


@dataclass
class Submitted:
    request_id: str
    placement: Placement
    handoff: Future  # -> Handoff, once prefill is done and decode has the request
    prompt: list[int] = field(default_factory=list)


class LocalCluster:
    def __init__(self, model: str = "skv-tiny", quant: QuantConfig | None = None, n_prefill: int = 1,
                 n_decode: int = 1, engine_config: EngineConfig = EngineConfig(),
                 store_config: StoreConfig = StoreConfig(), num_cpus: int | None = None,
                 policy: str = "cache_aware", cost_model: str | None = None, slo: SLO = SLO(),
                 device: str = "auto", prefill_num_gpus: float = 0.0, decode_num_gpus: float = 0.0,
                 num_gpus: int | None = None):
        if quant is not None and not quant.kv:
            raise ValueError("the cluster ships int8 KV between workers: use an int8 KV precision "
                             f"(got {quant.tag}); float runs need the single-process engine")
        check_gpu_keys(device, prefill_num_gpus, decode_num_gpus)
        self.cost_model = live_cost_model(model, cost_model)  # before Ray: a bad name fails fast
        self.policy = make_policy(policy, self.cost_model, slo)
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
        self._pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="pdserve-submit")
        try:
            check_gpu_capacity(n_prefill, prefill_num_gpus, n_decode, decode_num_gpus,
                               ray.cluster_resources().get("GPU", 0.0))
            self._start(model, quant, n_prefill, n_decode, engine_config, store_config, device,
                        prefill_num_gpus, decode_num_gpus)
        except BaseException:
            self.shutdown()  # what started so far, and our own Ray
            raise
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._live: dict[str, Submitted] = {}
        self._cancelled: set[str] = set()

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
        self.store = start_store(BlockSpec.of(cfg), self.fingerprint, KVLayout.of(cfg), store_config)
        frac = 1.0 / (n_prefill + n_decode)
        self.prefill = {f"prefill-{i}": ray.remote(PrefillActor).options(num_cpus=frac, num_gpus=prefill_num_gpus)
                        .remote() for i in range(n_prefill)}
        self.decode = {f"decode-{i}": ray.remote(DecodeActor).options(num_cpus=frac, num_gpus=decode_num_gpus,
                                                                      max_concurrency=256).remote()
                       for i in range(n_decode)}
        args = (model, quant, self.store, self.fingerprint, engine_config, device)
        actors = {**self.prefill, **self.decode}
        try:
            infos = ray.get([a.start.remote(name, *args) for name, a in actors.items()])
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, ResourceError):
                raise e.cause from None  # the worker's own message, without Ray's traceback around it
            raise
        self.workers: dict[str, WorkerInfo] = dict(zip(actors, infos))
        for p in infos[:n_prefill]:
            for d in infos[n_prefill:]:
                handshake(p, d)
        self.conductor = Conductor(self.policy, self.cost_model, list(self.prefill), list(self.decode),
                                   cfg.block_size, self.fingerprint)

    # -- requests --------------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams = SamplingParams(), session_id: str | None = None,
               request_id: str | None = None, ttft_slo_s: float | None = None, tbt_slo_s: float | None = None,
               priority: int = 0) -> Submitted:
        rid = request_id or f"r{next(self._ids)}"
        request = PlacementRequest(rid, len(prompt), session_id, ttft_slo_s, tbt_slo_s, priority, tuple(prompt))
        placement = self.conductor.place(request)
        if isinstance(placement, Reject):
            raise Rejected(rid, placement.reason)
        sub = Submitted(rid, placement, self._pool.submit(self._run, rid, prompt, params, placement), list(prompt))
        with self._lock:
            self._live[rid] = sub
        return sub

    def _run(self, rid: str, prompt: list[int], params: SamplingParams, placement: Placement) -> Handoff:
        ray = self.ray
        try:
            handoff: Handoff = ray.get(self.prefill[placement.prefill].prefill.remote(rid, prompt, params))
        except BaseException:
            self.conductor.finished(rid)
            raise
        self.conductor.prefilled(rid, handoff.keys, handoff.kv_tokens, handoff.cached_tokens)
        self.conductor.apply_events(ray.get(self.store.drain_events.remote()))
        if handoff.finish_reason is not None or rid in self._cancelled:
            self.conductor.finished(rid)
        if rid in self._cancelled:  # cancelled while prefilling: give back the lease, go no further
            if handoff.lease_id:
                ray.get(self.store.release.remote(handoff.lease_id))
            return handoff
        try:
            ray.get(self.decode[placement.decode].submit.remote(handoff, params))
        except BaseException:  # decode refused or failed: free the lease and the Conductor's slot
            if handoff.lease_id:
                ray.get(self.store.release.remote(handoff.lease_id))
            self.conductor.finished(rid)
            self._forget(rid)
            raise
        return handoff

    def stream(self, sub: Submitted) -> Iterator[RequestOutput]:
        sub.handoff.result()  # prefill done, decode has the request (or it was cancelled)
        if sub.request_id in self._cancelled:
            self._forget(sub.request_id)
            yield RequestOutput(sub.request_id, [], finished=True, finish_reason="abort")
            return
        actor = self.decode[sub.placement.decode]
        tokens, finished = [], False
        try:
            for ref in actor.stream.options(num_returns="streaming").remote(sub.request_id):
                out = self.ray.get(ref)
                tokens.extend(out.token_ids)
                finished = finished or (out.finished and out.finish_reason != "abort")
                yield out
        finally:
            # the decode worker publishes the KV of prompt + answer (the last token has none yet)
            self.conductor.finished(sub.request_id, sub.prompt + tokens[:-1] if finished else None)
            self._forget(sub.request_id)

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._live.pop(request_id, None)
            self._cancelled.discard(request_id)

    def generate(self, prompt: list[int], params: SamplingParams = SamplingParams(),
                 session_id: str | None = None) -> tuple[list[int], RequestOutput, Handoff]:
        sub = self.submit(prompt, params, session_id)
        tokens, last = [], None
        for out in self.stream(sub):
            tokens.extend(out.token_ids)
            last = out
        return tokens, last, sub.handoff.result()

    def cancel(self, request_id: str) -> None:
        self._cancelled.add(request_id)
        sub = self._live.get(request_id)
        if sub is not None:
            self.ray.get(self.decode[sub.placement.decode].cancel.remote(request_id))

    def store_stats(self) -> dict:
        return self.ray.get(self.store.snapshot.remote())

    def loads(self) -> dict[str, dict]:
        actors = {**self.prefill, **self.decode}
        return dict(zip(actors, self.ray.get([a.load.remote() for a in actors.values()])))

    def status(self) -> dict:
        """The cluster at a glance (the gateway serves it): worker loads, devices and GPU ids, store
        stats, the policy, and the Conductor's predicted vs delivered cache hits (design invariant 5)."""
        loads = self.loads()
        self.conductor.update_loads(loads)
        self.conductor.apply_events(self.ray.get(self.store.drain_events.remote()))
        stats = self.conductor.stats()
        workers = {name: {**load, "device": self.workers[name].device, "gpu_ids": list(self.workers[name].gpu_ids)}
                   for name, load in loads.items()}
        return {"workers": workers, "store": self.store_stats(), "policy": stats["policy"],
                "cost_model": self.cost_model.name, "predicted_hit_tokens": stats["predicted_hit_tokens"],
                "delivered_hit_tokens": stats["delivered_hit_tokens"],
                "delivered_partial_tokens": stats["delivered_partial_tokens"], "requests": stats["requests"],
                "rejected": stats["rejected"], "in_flight": stats["in_flight"]}

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for a in [*self.prefill.values(), *self.decode.values()]:
            try:
                self.ray.get(a.shutdown.remote(), timeout=10)
            except Exception:
                pass
        for a in [*self.prefill.values(), *self.decode.values(), *([self.store] if self.store is not None else [])]:
            self.ray.kill(a)
        if self.owns_ray:
            self.ray.shutdown()

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
