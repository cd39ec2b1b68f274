"""The prefill worker: loads the reusable prefix from the store, computes the rest, samples the
first token, publishes the prompt's KV and leases it to the decode worker.

One request at a time, on the calling thread: each request goes to decode as soon as its first
token exists. (A version batching concurrent prefills on a background engine loop measured slower
on a 2-core machine: 90 vs 132 tok/s end to end for 32 concurrent requests.)

The store is a help, not a dependency: a store that fails or is slow while matching or fetching
means those tokens are computed here (counted as recomputed), and one that fails while publishing
means the handoff carries no keys, so the decode worker computes the prompt's KV itself."""
from __future__ import annotations

import dataclasses
import itertools
import threading
import time

from kvstore.actor import fetch_export
from kvstore.blocks import BlockSpec
from kvstore.errors import KVLoadError, StoreUnavailable
from kvstore.faults import Fault, Faults, InjectedFault
from kvstore.handoff import Handoff, WorkerInfo, lease_owner
from model.engine import Engine, EngineConfig, SamplingParams
from model.transformer import Transformer


class KVLoading:
    """Fetching KV from the store with the recompute fallback, shared by both workers. Expects
    ``store``, ``spec``, ``faults``, ``store_timeout_s``, ``kv_load_failure`` and the counters
    ``kv_load_failures`` and ``recomputed_tokens`` on the worker."""

    def _fetch_or_recompute(self, keys: list[int], tokens: int, source=None):
        """The blocks of ``keys`` (their first ``tokens``), or None when they must be recomputed (counted);
        a missing or damaged block is also forgotten by the store. ``kv_load_failure = "fail"`` raises instead.
        ``source``: another node's store to read them from (Ray moves the bytes), else this node's."""
        store = self.store if source is None else source
        try:
            self.faults.hit("kv.fetch")  # "raise" here stands for a transfer that fails
            return fetch_export(store, self.spec, keys, tokens, self.store_timeout_s, remote=source is not None)
        except (KVLoadError, InjectedFault) as e:
            self.kv_load_failures += 1
            forget_damaged(store, keys, e, self.store_timeout_s)
            if self.kv_load_failure == "fail":
                raise KVLoadError(f"{e} (kv_load_failure = fail)") from None
            self.recomputed_tokens += tokens
            return None


class PrefillWorker(KVLoading):
    def __init__(self, name: str, model: Transformer, store, fingerprint: int,
                 engine_config: EngineConfig = EngineConfig(), tokenizer=None, lease_ttl_s: float = 60.0,
                 store_timeout_s: float = 10.0, kv_load_failure: str = "recompute"):
        self.name = name
        self.engine = Engine(model, engine_config, tokenizer)
        self.spec = BlockSpec.of(model.config)
        self.store = store  # a KVStore or the node's store actor (calls go through ``call``)
        self.fingerprint = fingerprint
        self.lease_ttl_s = lease_ttl_s
        self.store_timeout_s = store_timeout_s
        self.kv_load_failure = check_kv_load_failure(kv_load_failure)
        self.served = 0
        self.queued_tokens = 0  # tokens of the request being prefilled (the actor queues the rest)
        self.device = device_of(model)
        self.faults = Faults()
        self.kv_load_failures = 0
        self.recomputed_tokens = 0  # tokens the store held but could not hand over in time
        self._one_at_a_time = threading.Lock()  # the actor answers pings on other threads meanwhile

    def info(self) -> WorkerInfo:
        cfg = self.engine.mcfg
        return WorkerInfo(self.name, "prefill", cfg.block_size, "int8" if cfg.quant.kv else cfg.quant.compute,
                          self.fingerprint, device=self.device)

    def prefill(self, request_id: str, prompt: list[int], params: SamplingParams, source=None) -> Handoff:
        """``source``: another node's store that the placement expects to hold a longer prefix than
        this node's (the Conductor weighed fetching it against recomputing)."""
        with self._one_at_a_time:
            return self._prefill(request_id, prompt, params, source)

    def _prefill(self, request_id: str, prompt: list[int], params: SamplingParams, source=None) -> Handoff:
        t0 = time.perf_counter()
        before = self.recomputed_tokens
        prefix, remote = self._load_prefix(prompt, source)
        t1 = time.perf_counter()
        self.faults.hit("prefill.compute")
        first = dataclasses.replace(params, max_tokens=1, stop=())
        self.queued_tokens = len(prompt)
        try:
            rid = self.engine.add_request(prompt, first, request_id=request_id, prefix=prefix, hold_kv=True)
        finally:
            if prefix is not None:
                self.engine.release_prefix(prefix)
        try:
            outs = [o for o in self.engine.stream()]
        except BaseException:  # this request fails; the engine stays clean for the next one
            self.engine.abort(rid)
            self.queued_tokens = 0
            raise
        out = next(o for o in reversed(outs) if o.request_id == rid)
        t2 = time.perf_counter()
        token = out.token_ids[0] if out.token_ids else None
        stopped = out.finish_reason if token is None or params.max_tokens == 1 else None
        if stopped is None and token is not None and token in params.stop_token_ids:
            stopped = "stop"
        keys, lease, kv_tokens = [], None, 0
        try:
            data = self.engine.export_kv(rid)
            t = self.store_timeout_s
            call(self.store, "put", prompt, data, self.fingerprint, timeout=t)
            held = call(self.store, "match", prompt, False, timeout=t)  # its own blocks: not a hit
            if stopped is None and held.keys:
                lease = call(self.store, "lease", held.keys, self.lease_ttl_s, lease_owner(self.name, rid), timeout=t)
            keys, kv_tokens = held.keys, held.tokens
        except (StoreUnavailable, KeyError):  # not published (or evicted at once): decode computes it
            keys, lease, kv_tokens = [], None, 0
        finally:
            self.engine.release(rid)
            self.queued_tokens = 0
        self.served += 1
        self.faults.hit("prefill.reply")  # "exit" here: the lease granted, the handoff never sent
        t3 = time.perf_counter()
        return Handoff(rid, list(prompt), token, stopped, keys, kv_tokens, lease, out.cached_tokens,
                       {"load_prefix": t1 - t0, "prefill": t2 - t1, "publish": t3 - t2},
                       out.logprobs[0] if out.logprobs else None, self.recomputed_tokens - before,
                       remote if prefix is not None else 0)

    def _load_prefix(self, prompt: list[int], source=None):
        """(The prompt's cached prefix in this worker's pool or None, its tokens fetched from another
        node). This node's store first; ``source`` (another node's) where it holds more. A store that
        fails to match or to hand over the blocks costs recomputing them, never the request."""
        best, where = None, None
        for store in (self.store, source):
            if store is None:
                continue
            try:
                m = call(store, "match", prompt, timeout=self.store_timeout_s)
            except StoreUnavailable:
                continue
            if best is None or m.tokens > best.tokens:
                best, where = m, store
        if best is None or best.tokens == 0:  # a partial block counts too (invariant 2: token-granular reuse)
            return None, 0
        remote = where is not self.store
        data = self._fetch_or_recompute(best.keys, best.tokens, where if remote else None)
        return (None, 0) if data is None else (self.engine.import_kv(data), best.tokens if remote else 0)

    def load(self) -> dict:
        return {"name": self.name, "served": self.served, "queued_tokens": self.queued_tokens,
                "free_blocks": self.engine.pool.free_counts(), "kv_load_failures": self.kv_load_failures,
                "recomputed_tokens": self.recomputed_tokens}

    def arm_fault(self, point: str, action: str = "exit", after: int = 0, times: int = 1,
                  seconds: float = 0.0) -> None:
        """Fault injection (tests, ``pdserve chaos``): see ``kvstore.faults``."""
        self.faults.arm(Fault(point, action, after, times, seconds))

    def shutdown(self) -> None:
        """Nothing runs in the background here; for symmetry with the decode worker."""


def device_of(model: Transformer) -> str:
    """Where a model's tensors live ("cpu", "cuda:0"): the device its worker computes on."""
    return str(next(itertools.chain(model.buffers(), model.parameters())).device)


def check_kv_load_failure(policy: str) -> str:
    if policy not in ("recompute", "fail"):
        raise ValueError(f"kv_load_failure must be 'recompute' or 'fail', got {policy!r}")
    return policy


def forget_damaged(store, keys: list[int], error: Exception, timeout_s: float) -> None:
    """A block that failed its checksum (``KVLoadError(msg, index)``) and those chained after it
    leave the store, so nobody is served them again."""
    if len(error.args) > 1:
        try:
            call(store, "drop", keys[error.args[1]:], timeout=timeout_s)
        except StoreUnavailable:
            pass


def call(target, method: str, *args, timeout: float | None = None):
    """Call a store method on a local object or a Ray actor alike. Under Ray the wait is bounded by
    ``timeout`` and a store that is dead, restarting or late raises ``StoreUnavailable``; the
    method's own exceptions (KeyError, ValueError) arrive as themselves."""
    fn = getattr(target, method)
    if not hasattr(fn, "remote"):
        return fn(*args)
    import ray

    try:
        return ray.get(fn.remote(*args), timeout=timeout)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, Exception):
            raise e.cause from None
        raise StoreUnavailable(f"KV store: {method} failed") from None
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ray.exceptions.ObjectLostError) as e:
        raise StoreUnavailable(f"KV store: {method} got no answer ({type(e).__name__})") from None
