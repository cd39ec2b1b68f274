"""The decode worker: pulls leased blocks from the store, acknowledges the lease, joins the
request to its continuous batch, streams tokens, and publishes the conversation's KV at the end.

One engine loop runs on a background thread; requests arrive and streams are read on other
threads (a threaded Ray actor), all engine access under one lock.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
import time

from kvstore.actor import fetch_export
from kvstore.blocks import BlockSpec
from kvstore.handoff import Handoff, WorkerInfo
from model.engine import Engine, EngineConfig, RequestOutput, SamplingParams
from model.transformer import Transformer
from prefill.worker import call, device_of  # the helpers the prefill worker uses too


class DecodeWorker:
    def __init__(self, name: str, model: Transformer, store, fingerprint: int,
                 engine_config: EngineConfig = EngineConfig(), tokenizer=None, publish: bool = True):
        self.name = name
        self.engine = Engine(model, engine_config, tokenizer)
        self.spec = BlockSpec.of(model.config)
        self.store = store
        self.fingerprint = fingerprint
        self.publish = publish  # put each finished conversation's KV in the store (next turn hits)
        self.lock = threading.RLock()
        self.streams: dict[str, queue.Queue] = {}
        self.prompts: dict[str, list[int]] = {}
        self.step_times: list[float] = []
        self.device = device_of(model)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"{name}-engine", daemon=True)
        self._thread.start()

    def info(self) -> WorkerInfo:
        cfg = self.engine.mcfg
        return WorkerInfo(self.name, "decode", cfg.block_size, "int8" if cfg.quant.kv else cfg.quant.compute,
                          self.fingerprint, device=self.device)

    # -- requests --------------------------------------------------------------------------------
    def submit(self, handoff: Handoff, params: SamplingParams) -> None:
        """Take over a prefilled request. Its first token is streamed at once."""
        rid = handoff.request_id
        out_q: queue.Queue = queue.Queue()
        with self.lock:
            if rid in self.streams:
                raise ValueError(f"request_id {rid!r} is already being decoded here")
            self.streams[rid] = out_q
        if handoff.first_token is None or handoff.finish_reason is not None:
            tokens = [handoff.first_token] if handoff.first_token is not None else []
            out_q.put(RequestOutput(rid, tokens, finished=True, finish_reason=handoff.finish_reason,
                                    prompt_tokens=len(handoff.prompt), cached_tokens=handoff.cached_tokens,
                                    completion_tokens=len(tokens)))
            return
        prefix = None
        try:
            data = fetch_export(self.store, self.spec, handoff.keys, handoff.kv_tokens) if handoff.keys else None
            if handoff.lease_id is not None:
                call(self.store, "release", handoff.lease_id)  # acknowledged: the blocks are ours now
            tokens = handoff.prompt + [handoff.first_token]
            rest = dataclasses.replace(params, max_tokens=params.max_tokens - 1) if params.max_tokens > 1 else None
            out_q.put(RequestOutput(rid, [handoff.first_token], prompt_tokens=len(handoff.prompt),
                                    cached_tokens=handoff.cached_tokens, completion_tokens=1,
                                    finished=rest is None, finish_reason="length" if rest is None else None,
                                    logprobs=[handoff.logprob] if params.logprobs else None))
            if rest is None:
                return
            with self.lock:
                if data is not None:
                    prefix = self.engine.import_kv(data)
                self.prompts[rid] = tokens
                self.engine.add_request(tokens, rest, request_id=rid, prefix=prefix, hold_kv=self.publish)
        except Exception:
            with self.lock:  # the caller gets the exception; nobody will stream this request
                self.streams.pop(rid, None)
                self.prompts.pop(rid, None)
            raise
        finally:
            if prefix is not None:
                with self.lock:
                    self.engine.release_prefix(prefix)

    def stream(self, request_id: str, timeout_s: float = 600.0):
        """Yields RequestOutput as tokens are made; the last one is finished."""
        with self.lock:
            out_q = self.streams.get(request_id)
        if out_q is None:
            raise KeyError(f"unknown request {request_id!r}")
        try:
            while True:
                out = out_q.get(timeout=timeout_s)
                yield out
                if out.finished:
                    return
        finally:
            with self.lock:
                self.streams.pop(request_id, None)

    def cancel(self, request_id: str) -> bool:
        with self.lock:
            out = self.engine.abort(request_id)
            self.prompts.pop(request_id, None)
            q = self.streams.get(request_id)
        if q is not None:
            q.put(RequestOutput(request_id, [], finished=True, finish_reason="abort"))
        return out is not None

    def load(self) -> dict:
        with self.lock:
            s = self.engine.scheduler
            return {"name": self.name, "running": len(s.running), "waiting": len(s.waiting),
                    "free_blocks": self.engine.pool.free_counts(), "capacity": self.engine.pool.capacity,
                    "mean_step_s": sum(self.step_times[-50:]) / max(1, len(self.step_times[-50:]))}

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    # -- the engine loop -------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            with self.lock:
                if not self.engine.has_work():
                    outs = None
                else:
                    t = time.perf_counter()
                    outs = self.engine.step()
                    self.step_times.append(time.perf_counter() - t)
                    for out in outs:
                        if out.finished and self.publish and out.request_id in self.engine.sequences:
                            self._publish(out.request_id)
            if outs is None:
                time.sleep(0.002)
                continue
            for out in outs:
                q = self.streams.get(out.request_id)
                if q is not None:
                    out.completion_tokens += 1  # the first token came from the prefill worker
                    q.put(out)

    def _publish(self, rid: str) -> None:
        try:
            seq = self.engine.sequences[rid]
            data = self.engine.export_kv(rid)
            call(self.store, "put", seq.tokens, data, self.fingerprint)
        finally:
            self.engine.release(rid)
            self.prompts.pop(rid, None)
