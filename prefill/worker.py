"""The prefill worker: loads the reusable prefix from the store, computes the rest, samples the
first token, publishes the prompt's KV and leases it to the decode worker.

Concurrent ``prefill`` calls (a threaded Ray actor) share one engine stepped by an
``EngineLoop``, so their chunks are batched together.
"""
from __future__ import annotations

import dataclasses
import threading
import time

from kvstore.handoff import Handoff, WorkerInfo
from model.engine import Engine, EngineConfig, RequestOutput, SamplingParams
from model.engine.loop import EngineLoop
from model.transformer import Transformer


class PrefillWorker:
    def __init__(self, name: str, model: Transformer, store, fingerprint: int,
                 engine_config: EngineConfig = EngineConfig(), tokenizer=None, lease_ttl_s: float = 60.0):
        self.name = name
        self.engine = Engine(model, engine_config, tokenizer)
        self.store = store  # a KVStore or the node's store actor (calls go through ``call``)
        self.fingerprint = fingerprint
        self.lease_ttl_s = lease_ttl_s
        self.served = 0
        self.queued_tokens = 0
        self._waiting: dict[str, tuple[threading.Event, list[RequestOutput]]] = {}
        self.loop = EngineLoop(self.engine, self._on_outputs, name=f"{name}-engine")

    def info(self) -> WorkerInfo:
        cfg = self.engine.mcfg
        return WorkerInfo(self.name, "prefill", cfg.block_size, "int8" if cfg.quant.kv else cfg.quant.compute,
                          self.fingerprint)

    def prefill(self, request_id: str, prompt: list[int], params: SamplingParams,
                timeout_s: float = 600.0) -> Handoff:
        t0 = time.perf_counter()
        m = call(self.store, "match", prompt)
        data = call(self.store, "get", m.keys, m.tokens) if m.tokens >= self.engine.pool.block_size else None
        t1 = time.perf_counter()
        done, result = threading.Event(), []
        first = dataclasses.replace(params, max_tokens=1, stop=())
        with self.loop.lock:
            prefix = self.engine.import_kv(data) if data is not None else None
            try:
                self.engine.add_request(prompt, first, request_id=request_id, prefix=prefix, hold_kv=True)
            finally:
                if prefix is not None:
                    self.engine.release_prefix(prefix)
            self._waiting[request_id] = (done, result)
            self.queued_tokens += len(prompt)
        if not done.wait(timeout_s):
            with self.loop.lock:
                self.engine.abort(request_id)
                self._waiting.pop(request_id, None)
            raise TimeoutError(f"prefill of {request_id!r} took longer than {timeout_s}s")
        out = result[0]
        t2 = time.perf_counter()
        token = out.token_ids[0] if out.token_ids else None
        stopped = out.finish_reason if token is None or params.max_tokens == 1 else None
        keys, lease, kv_tokens = [], None, 0
        try:
            with self.loop.lock:
                exported = self.engine.export_kv(request_id)
            call(self.store, "put", prompt, exported, self.fingerprint)
            held = call(self.store, "match", prompt)
            keys, kv_tokens = held.keys, held.tokens
            if stopped is None and keys:
                lease = call(self.store, "lease", keys, self.lease_ttl_s, self.name)
        finally:
            with self.loop.lock:
                self.engine.release(request_id)
                self.queued_tokens -= len(prompt)
        self.served += 1
        t3 = time.perf_counter()
        return Handoff(request_id, list(prompt), token, stopped, keys, kv_tokens, lease, out.cached_tokens,
                       {"load_prefix": t1 - t0, "prefill": t2 - t1, "publish": t3 - t2},
                       out.logprobs[0] if out.logprobs else None)

    def _on_outputs(self, outs: list[RequestOutput]) -> None:  # under the loop's lock
        for out in outs:
            if out.finished and out.request_id in self._waiting:
                done, result = self._waiting.pop(out.request_id)
                result.append(out)
                done.set()

    def load(self) -> dict:
        with self.loop.lock:
            return {"name": self.name, "served": self.served, "queued_tokens": self.queued_tokens,
                    "running": len(self.engine.scheduler.running), "free_blocks": self.engine.pool.free_counts(),
                    "mean_step_s": self.loop.mean_step_s()}

    def shutdown(self) -> None:
        self.loop.stop()


def call(target, method: str, *args):
    """Call a store method on a local object or a Ray actor alike."""
    fn = getattr(target, method)
    if hasattr(fn, "remote"):
        import ray

        return ray.get(fn.remote(*args))
    return fn(*args)
