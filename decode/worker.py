"""The decode worker: pulls leased blocks from the store, acknowledges the lease, joins the
request to its continuous batch, streams tokens, and publishes the conversation's KV at the end.

A handoff whose KV finds no room in the pool waits in this worker (``pending``, oldest first) until
requests finish and free their blocks; only a request larger than the whole pool is refused.

One engine loop runs on a background thread; requests arrive and streams are read on other
threads (a threaded Ray actor), all engine access under one lock.

Failure is normal here: KV that cannot be fetched (store gone, late, a block failing its checksum)
is recomputed by this engine (``kv_load_failure = "recompute"``, the default) or fails the request
(``"fail"``); a publish that fails costs the next turn a cache hit, never this request; an
exception in an engine step fails the requests of that batch and the loop goes on. While a
request runs, each block it fills is published too, so that if this worker dies the request can
resume elsewhere from the store instead of recomputing everything.
"""
from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time

from decode.fair_lock import FairLock
from kvstore.blocks import BlockSpec
from kvstore.errors import StoreUnavailable
from kvstore.faults import Fault, Faults, InjectedFault
from kvstore.handoff import Handoff, WorkerInfo
from model.engine import Engine, EngineConfig, RequestOutput, SamplingParams
from model.transformer import Transformer
# the helpers the prefill worker uses too
from prefill.worker import KVLoading, call, check_kv_load_failure, device_of

STEP_FAILED = "error: the decode engine failed on this request's batch"
IMPORT_FAILED = "error: the decode worker could not take in this request's KV"
WARM_UP_STEPS = 8  # decode steps of one sequence a decode worker times at start (the Conductor's first estimate)
WARM_UP_PROMPT = 16  # ... after a prompt of this many tokens


@dataclasses.dataclass
class _Import:
    """A handed-off request waiting to join the engine: for room for its KV, or behind those that do."""
    rid: str
    data: object  # KVExport, or None when its KV is recomputed here
    tokens: list[int]
    params: SamplingParams


class DecodeWorker(KVLoading):
    def __init__(self, name: str, model: Transformer, store, fingerprint: int,
                 engine_config: EngineConfig = EngineConfig(), tokenizer=None, publish: bool = True,
                 store_timeout_s: float = 10.0, kv_load_failure: str = "recompute", keepalive_s: float = 2.0):
        self.name = name
        self.engine = Engine(model, engine_config, tokenizer)
        self.spec = BlockSpec.of(model.config)
        self.store = store
        self.fingerprint = fingerprint
        self.publish = publish  # put each finished conversation's KV in the store (next turn hits)
        self.lock = FairLock()  # (a plain lock starves every thread but the engine loop's)
        self.streams: dict[str, queue.Queue] = {}
        self.step_times: list[float] = []
        self.device = device_of(model)
        self.store_timeout_s = store_timeout_s
        self.kv_load_failure = check_kv_load_failure(kv_load_failure)
        self.faults = Faults()
        self.published: dict[str, int] = {}  # running request -> tokens of its KV already in the store
        self.last_puts: dict[str, object] = {}  # running request -> its last put's answer (a Ray ref under Ray)
        self.pending: collections.deque[_Import] = collections.deque()  # handoffs waiting for free blocks
        self.kv_load_failures = self.recomputed_tokens = self.publish_failures = self.step_failures = 0
        self.keepalive_s = keepalive_s
        self.loop_ticks = 0  # engine loop iterations: a waiting stream's keep-alive says the loop moves
        self.busy_since: float | None = None  # when the engine loop's current step began (None: between steps)
        self.warm_up = self._warm_up()  # (context tokens, seconds) of a decode step of one sequence, timed at start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"{name}-engine", daemon=True)
        self._thread.start()

    def _warm_up(self) -> tuple[int, float] | None:
        """Pays the engine's first-call costs before the first stream instead of in its first tokens, then times
        ``WARM_UP_STEPS`` decode steps of one sequence (from its first token to its last), from which the
        Conductor starts its estimate of this worker. None where the pool cannot hold it (tests)."""
        vocab = self.engine.mcfg.vocab_size
        prompt = [3 + (5 * i) % (vocab - 3) for i in range(WARM_UP_PROMPT)]
        params = SamplingParams(max_tokens=WARM_UP_STEPS + 1, ignore_eos=True)
        try:
            self.engine.check_request(prompt, params)
        except ValueError:
            return None
        self.engine.generate([prompt], SamplingParams(max_tokens=2, ignore_eos=True))  # first-call costs
        self.engine.add_request(prompt[::-1], params)  # (another prompt: no prefix hit)
        times = [time.perf_counter() for _ in self.engine.stream()]  # one output per step
        return WARM_UP_PROMPT, (times[-1] - times[0]) / max(1, len(times) - 1)

    def info(self) -> WorkerInfo:
        cfg = self.engine.mcfg
        return WorkerInfo(self.name, "decode", cfg.block_size, "int8" if cfg.quant.kv else cfg.quant.compute,
                          self.fingerprint, device=self.device)

    # -- requests --------------------------------------------------------------------------------
    def submit(self, handoff: Handoff, params: SamplingParams, source=None) -> dict:
        """Take over a prefilled request. Its first token is streamed at once. Returns what loading
        its KV cost: ``recomputed_tokens`` (KV that could not be fetched, computed here instead).
        ``source``: the store holding the handoff's blocks and lease when it is another node's."""
        rid = handoff.request_id
        out_q: queue.Queue = queue.Queue()
        with self.lock:
            stale = self.streams.get(rid)
            if stale is not None:  # placed here again: the cluster gave this placement up (silent past the
                self._drop(rid)  # stall timeout, e.g. a stuck step), so it ends and the new one takes over
                stale.put(RequestOutput(rid, [], finished=True, finish_reason="abort"))
            self.streams[rid] = out_q
        if handoff.first_token is None or handoff.finish_reason is not None:
            tokens = [handoff.first_token] if handoff.first_token is not None else []
            out_q.put(RequestOutput(rid, tokens, finished=True, finish_reason=handoff.finish_reason,
                                    prompt_tokens=len(handoff.prompt), cached_tokens=handoff.cached_tokens,
                                    completion_tokens=len(tokens)))
            return {"recomputed_tokens": 0}
        try:
            data, recomputed = self._fetch(handoff, source)
            tokens = handoff.prompt + [handoff.first_token]
            rest = dataclasses.replace(params, max_tokens=params.max_tokens - 1) if params.max_tokens > 1 else None
            out_q.put(RequestOutput(rid, [handoff.first_token], prompt_tokens=len(handoff.prompt),
                                    cached_tokens=handoff.cached_tokens, completion_tokens=1,
                                    finished=rest is None, finish_reason="length" if rest is None else None,
                                    logprobs=[handoff.logprob] if params.logprobs else None))
            if rest is None:
                return {"recomputed_tokens": recomputed}
            with self.lock:  # it waits here until the pool has room for its KV (requests ahead go first)
                self.engine.check_request(tokens, rest)  # (one that never fits the pool is refused)
                if data is not None:
                    self.engine.blocks_to_import(data)  # (raises for KV this pool cannot take: wrong layout)
                self.pending.append(_Import(rid, data, tokens, rest))
                if not recomputed and source is None:  # what the prefill worker stored in this node's store
                    self.published[rid] = handoff.kv_tokens // self.spec.block_size * self.spec.block_size
                self._admit_pending()
        except Exception:
            with self.lock:  # the caller gets the exception; nobody will stream this request
                if self.streams.get(rid) is out_q:
                    del self.streams[rid]
                    self._forget(rid)
            raise
        return {"recomputed_tokens": recomputed}

    def _admit_pending(self) -> None:
        """Import the KV of waiting handoffs, oldest first, while the pool has room for each beside a
        block per request in the engine (so that admitting one does not preempt those already decoding)."""
        while self.pending:
            head = self.pending[0]
            need = self.engine.blocks_to_import(head.data) if head.data is not None else []
            busy = self.engine.has_work()
            headroom = len(self.engine.sequences) if busy else 0
            if any(n + headroom > self.engine.pool.num_free(g) for g, n in enumerate(need)):
                if busy:
                    return  # blocks come free as requests finish
            self.pending.popleft()
            prefix = None
            try:
                if head.data is not None:  # (else its KV could not be fetched: the engine computes it)
                    prefix = self.engine.import_kv(head.data)
                self.engine.add_request(head.tokens, head.params, request_id=head.rid, prefix=prefix,
                                        hold_kv=self.publish)
            except Exception as e:  # noqa: BLE001 - this request fails, the others go on
                self._forget(head.rid)
                q = self.streams.get(head.rid)
                if q is not None:
                    q.put(RequestOutput(head.rid, [], finished=True, finish_reason=f"{IMPORT_FAILED}: {e}"))
            finally:
                if prefix is not None:
                    self.engine.release_prefix(prefix)

    def _fetch(self, handoff: Handoff, source=None):
        """The handoff's KV and the tokens to recompute for lack of it; the lease is acknowledged
        either way (a store that does not answer lets it expire)."""
        data, recomputed = None, 0
        try:
            if handoff.keys:
                data = self._fetch_or_recompute(handoff.keys, handoff.kv_tokens, source)
                recomputed = handoff.kv_tokens if data is None else 0
        finally:
            if handoff.lease_id is not None:
                try:
                    call(source or self.store, "release", handoff.lease_id, timeout=self.store_timeout_s)
                except StoreUnavailable:
                    pass
        return data, recomputed

    def stream(self, request_id: str, timeout_s: float = 600.0):
        """Yields RequestOutput as tokens are made; the last one is finished. A request that waits
        (for room in the pool, or behind a full batch) gets an empty output every ``keepalive_s`` while
        the engine loop goes on, so that the driver does not take a long queue for a stalled worker; a
        worker whose loop is stuck stays silent."""
        out_q = self.streams.get(request_id)  # (no engine lock: one dict read)
        if out_q is None:
            raise KeyError(f"unknown request {request_id!r}")
        silent_since, ticks = time.monotonic(), self.loop_ticks
        try:
            while True:
                try:
                    out = out_q.get(timeout=self.keepalive_s)
                except queue.Empty:
                    if time.monotonic() - silent_since > timeout_s:
                        raise
                    if self.loop_ticks != ticks:  # queued behind others, and the engine is moving
                        ticks = self.loop_ticks
                        yield RequestOutput(request_id, [])  # (a keep-alive: no tokens, not finished)
                    continue
                silent_since = time.monotonic()
                yield out
                if out.finished:
                    return
        finally:
            with self.lock:
                if self.streams.get(request_id) is out_q:  # (not a newer placement's of the same request)
                    del self.streams[request_id]

    def cancel(self, request_id: str) -> bool:
        with self.lock:
            dropped = self._drop(request_id)
            q = self.streams.get(request_id)
        if q is not None:
            q.put(RequestOutput(request_id, [], finished=True, finish_reason="abort"))
        return dropped

    def _drop(self, rid: str) -> bool:
        """The request out of the engine (its blocks freed) and out of the waiting handoffs; False if neither held
        it. The caller holds the lock."""
        out = self.engine.abort(rid)
        waiting = [p for p in self.pending if p.rid == rid]
        for p in waiting:
            self.pending.remove(p)
        self._forget(rid)
        return out is not None or bool(waiting)

    def load(self) -> dict:
        """Counters and queue lengths, read without the engine lock: the supervisor's ping must answer
        while a long step runs (a 512-token recompute chunk can outlast ``unresponsive_s``). ``busy_s``
        (how long the engine loop has been in its current step) tells a long step from a stuck one."""
        s, times = self.engine.scheduler, self.step_times[-50:]
        since = self.busy_since
        return {"name": self.name, "running": len(s.running), "waiting": len(s.waiting) + len(self.pending),
                "free_blocks": self.engine.pool.free_counts(), "capacity": self.engine.pool.capacity,
                "mean_step_s": sum(times) / max(1, len(times)), "warm_up_step": self.warm_up,
                "busy_s": 0.0 if since is None else time.monotonic() - since,
                "kv_load_failures": self.kv_load_failures, "recomputed_tokens": self.recomputed_tokens,
                "publish_failures": self.publish_failures, "step_failures": self.step_failures}

    def arm_fault(self, point: str, action: str = "exit", after: int = 0, times: int = 1,
                  seconds: float = 0.0) -> None:
        """Fault injection (tests, ``pdserve chaos``): see ``kvstore.faults``."""
        self.faults.arm(Fault(point, action, after, times, seconds))

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    # -- the engine loop -------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            self.loop_ticks += 1
            self.busy_since = time.monotonic()
            try:
                outs = self._step()
            except Exception:  # noqa: BLE001 - one bad batch must not stop the worker
                self._fail_running()
                continue
            finally:
                self.busy_since = None
            if outs is None:
                time.sleep(0.002)
                continue
            for q, out in outs:
                if q is not None:
                    out.completion_tokens += 1  # the first token came from the prefill worker
                    q.put(out)

    def _step(self) -> list[tuple[queue.Queue | None, RequestOutput]] | None:
        """One engine step; its outputs with the streams they go to, looked up under the lock (a request
        placed here again after the step would otherwise get the old placement's token)."""
        with self.lock:
            self._admit_pending()
            if not self.engine.has_work():
                return None
            self.faults.hit("decode.step")
            t = time.perf_counter()
            outs = self.engine.step()
            self.step_times.append(time.perf_counter() - t)
            del self.step_times[:-1000]
            for out in outs:
                if out.finished and self.publish and out.request_id in self.engine.sequences:
                    self._publish(out.request_id)
                elif out.finished:
                    self._forget(out.request_id)
            if self.publish:
                self._publish_running()
            return [(self.streams.get(out.request_id), out) for out in outs]

    def _fail_running(self) -> None:
        """An engine step raised: the requests of the engine end with an error (the cluster may
        resume them elsewhere), their blocks are freed, and the loop goes on with new ones."""
        with self.lock:
            self.step_failures += 1
            failed = list(self.engine.sequences)
            for rid in failed:
                self.engine.abort(rid)
                self._forget(rid)
            streams = [(rid, self.streams.get(rid)) for rid in failed]
        for rid, q in streams:
            if q is not None:
                q.put(RequestOutput(rid, [], finished=True, finish_reason=STEP_FAILED))

    def _publish(self, rid: str) -> None:
        """The finished conversation's KV to the store, best effort (a failure costs the next turn a
        cache hit); its blocks are freed either way. Only what the store lacks goes: the blocks since the
        last put (at least the last one, whose answer says whether the store still holds the rest); the
        whole context when it does not (evicted, or the store restarted)."""
        try:
            self.faults.hit("decode.publish")
            seq, bs, t = self.engine.sequences[rid], self.spec.block_size, self.store_timeout_s
            start = min(self.published.get(rid, 0), (seq.computed - 1) // bs * bs)
            tail = self.engine.export_kv(rid, start)
            if call(self.store, "put", seq.tokens, tail, self.fingerprint, timeout=t) is None:
                call(self.store, "put", seq.tokens, self.engine.export_kv(rid), self.fingerprint, timeout=t)
        except (StoreUnavailable, InjectedFault, ValueError):
            self.publish_failures += 1
        finally:
            self.engine.release(rid)
            self._forget(rid)

    def _forget(self, rid: str) -> None:
        """What this worker kept about a request's publishing, once it ends here."""
        self.published.pop(rid, None)
        self.last_puts.pop(rid, None)

    def _prefix_lost(self, rid: str) -> bool:
        """Whether the store refused the request's last put (answered None: it no longer holds the prefix
        those blocks extend, evicted or restarted). An answer not in yet, or a put that failed (a store
        that died), says nothing: the next put that finds the prefix missing is refused, and tells."""
        answer = self.last_puts.pop(rid, [])
        if answer is None or isinstance(answer, list):
            return answer is None
        import ray

        if not ray.wait([answer], timeout=0)[0]:
            self.last_puts[rid] = answer
            return False
        try:
            return ray.get(answer) is None
        except Exception:  # noqa: BLE001
            return False

    def _publish_running(self) -> None:
        """Each running request's newly filled blocks go to the store without waiting for the answer
        (a migrated request resumes from them): only the blocks since its last put, which extend the
        prefix the store holds (its whole context at every block would cost O(context) a block). A store
        that answered that it lost that prefix (evicted, restarted) gets the whole context at the next
        block. Best effort: a failed put only costs recomputing."""
        bs = self.spec.block_size
        for rid, seq in self.engine.sequences.items():
            full, start = seq.computed // bs * bs, self.published.get(rid, 0)
            if full <= start or seq.status.name != "RUNNING":
                continue
            if self._prefix_lost(rid):
                start = 0  # the store lost what the last puts extended: the whole context, once
            self.published[rid] = full
            try:
                data = self.engine.export_kv(rid, start, full)
                fn = self.store.put
                args = (seq.tokens[:full], data, self.fingerprint)
                self.last_puts[rid] = fn.remote(*args) if hasattr(fn, "remote") else fn(*args)
            except Exception:  # noqa: BLE001 - publishing is a help, never the request's failure
                self.publish_failures += 1
