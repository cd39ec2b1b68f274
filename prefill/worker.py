"""The prefill worker: loads the reusable prefix from the store, computes the rest, samples the
first token, publishes the prompt's KV and leases it to the decode worker.

Concurrent calls are prefilled together, on the callers' own threads (``PrefillWorker``); each
request goes to decode as soon as its first token exists.

The store is a help, not a dependency: a store that fails or is slow while matching or fetching
means those tokens are computed here (counted as recomputed), and one that fails while publishing
means the handoff carries no keys, so the decode worker computes the prompt's KV itself."""
from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from dataclasses import dataclass

from kvstore.actor import fetch_export
from kvstore.blocks import BlockSpec
from kvstore.errors import KVLoadError, StoreUnavailable
from kvstore.faults import Fault, Faults, InjectedFault
from kvstore.handoff import Handoff, WorkerInfo, lease_owner
from model.engine import Engine, EngineConfig, KVExport, RequestOutput, SamplingParams
from model.transformer import Transformer

WARM_UP_TOKENS = (128, 512)  # prompts a prefill worker times at start (scheduler.correction's first estimate)


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


@dataclass
class _Job:
    """One prefill call: what its caller brought, then what the engine made of it."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    data: KVExport | None  # the prompt's reusable prefix, fetched from a store by the caller
    settled: bool = False
    output: RequestOutput | None = None  # the request's last output (its first token)
    kv: KVExport | None = None  # the prompt's KV, exported before its blocks were freed
    error: BaseException | None = None
    computed_at: float = 0.0
    busy_s: float | None = None  # the engine's busy seconds since the worker's previous prompt was computed


class PrefillWorker(KVLoading):
    """Prefills concurrent calls together (continuous batching): each call fetches its prefix from the
    store and, once computed, publishes its KV on its own thread; in between, whichever waiting call finds
    nobody stepping the engine steps it for everyone queued (up to ``max_batched_tokens`` of prompt per
    step), and hands that role on once its own request is computed. A call returns as soon as its own
    request is computed and published, not when the batch is. A call whose stored prefix finds no free blocks
    waits until the requests ahead free theirs (alone it would have fitted). The engine's int8 path is
    batch-invariant, so a prompt's first token and KV are the same bits batched or alone."""

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
        self.queued_tokens = 0  # prompt tokens of the calls not yet computed
        self.device = device_of(model)
        self.faults = Faults()
        self.kv_load_failures = 0
        self.recomputed_tokens = 0  # tokens the store held but could not hand over in time
        self._turn = threading.Condition()  # guards the queue, the jobs' fields and who steps the engine
        self._queue: list[_Job] = []  # admitted by the next step
        self._in_engine: dict[str, _Job] = {}
        self._stepping = False
        self.busy_since: float | None = None  # when the engine's current step began (None: between steps)
        self.busy_total_s = 0.0  # seconds in engine steps since start (not the warm-up)
        self._busy_at_last_prompt = 0.0  # ``busy_total_s`` (with the step then running) when a prompt was last computed
        self.warm_up = self._warm_up()  # [(prompt tokens, seconds)]: this worker's speed before any request

    def _warm_up(self) -> list[tuple[int, float]]:
        """Pays the engine's first-call costs (the int8 GEMM plan's probe, the weights' CPU forms, kernel caches)
        before the first request instead of in its TTFT, then times prompts of ``WARM_UP_TOKENS``, from which
        the Conductor starts its estimate of this worker's speed (it has no other until prompts finish here)."""
        cfg, one, timed = self.engine.mcfg, SamplingParams(max_tokens=1), []
        for n in (16, *WARM_UP_TOKENS):  # the first pays the first-call costs, untimed
            prompt = [3 + (n + 7 * i) % (cfg.vocab_size - 3) for i in range(min(n, cfg.max_seq_len - 1))]
            try:
                self.engine.check_request(prompt, one)
            except ValueError:  # a pool too small for it (tests): a shorter warm-up
                break
            t = time.perf_counter()
            self.engine.generate([prompt], one)
            if n != 16:
                timed.append((len(prompt), time.perf_counter() - t))
        return timed

    def info(self) -> WorkerInfo:
        cfg = self.engine.mcfg
        return WorkerInfo(self.name, "prefill", cfg.block_size, "int8" if cfg.quant.kv else cfg.quant.compute,
                          self.fingerprint, device=self.device)

    def prefill(self, request_id: str, prompt: list[int], params: SamplingParams, source=None) -> Handoff:
        """``source``: another node's store that the placement expects to hold a longer prefix than
        this node's (the Conductor weighed fetching it against recomputing)."""
        t0 = time.perf_counter()
        data, remote, recomputed = self._load_prefix(prompt, source)
        t1 = time.perf_counter()
        self.faults.hit("prefill.compute")
        job = _Job(request_id, list(prompt), dataclasses.replace(params, max_tokens=1, stop=()), data)
        self._compute(job)
        out, t2 = job.output, job.computed_at
        token = out.token_ids[0] if out.token_ids else None
        stopped = out.finish_reason if token is None or params.max_tokens == 1 else None
        if stopped is None and token is not None and token in params.stop_token_ids:
            stopped = "stop"
        keys, lease, kv_tokens = self._publish(request_id, prompt, job.kv, stopped is None)
        self.faults.hit("prefill.reply")  # "exit" here: the lease granted, the handoff never sent
        t3 = time.perf_counter()
        return Handoff(request_id, list(prompt), token, stopped, keys, kv_tokens, lease, out.cached_tokens,
                       {"load_prefix": t1 - t0, "prefill": t2 - t1, "publish": t3 - t2},
                       out.logprobs[0] if out.logprobs else None, recomputed, remote, job.busy_s)

    # -- the shared engine ---------------------------------------------------------------------------
    def _compute(self, job: _Job) -> None:
        """Queue the job and wait until it is computed, stepping the engine while nobody else does."""
        with self._turn:
            self._queue.append(job)
            self.queued_tokens += len(job.prompt)
            while not job.settled and self._stepping:
                self._turn.wait()
            if not job.settled:  # nobody steps: this call does, until its own job is computed
                self._stepping = True
                try:
                    while not job.settled:
                        self._step_locked()
                finally:
                    self._stepping = False
                    self._turn.notify_all()  # the next waiting call steps on
        if job.error is not None:
            raise job.error

    def _step_locked(self) -> None:
        """Admit the queued jobs, run one engine step, settle the jobs it computed. Holds ``_turn`` only
        between the engine's calls: the step itself runs with it released, so calls can queue meanwhile."""
        admit, self._queue = self._queue, []
        self._turn.release()
        waiting: list[_Job] = []
        self.busy_since = time.monotonic()
        try:
            for i, job in enumerate(admit):
                if not self._admit(job):  # no room for its prefix yet: it and those after it wait their turn
                    waiting = admit[i:]
                    break
            try:
                self.faults.hit("prefill.step")
                outs = self.engine.step() if self.engine.has_work() else []
            except Exception as e:  # noqa: BLE001 - the batch fails; the engine stays clean for the next
                outs = []
                for rid, failed in list(self._in_engine.items()):
                    self.engine.abort(rid)
                    self._settle(failed, error=e)
            for out in outs:
                job = self._in_engine.get(out.request_id)
                if job is not None and out.finished:
                    self._finish(job, out)
        finally:
            self.busy_total_s += time.monotonic() - self.busy_since
            self.busy_since = None
            self._turn.acquire()
            self._queue = waiting + self._queue
        self._turn.notify_all()

    def _admit(self, job: _Job) -> bool:
        """The job into the engine, or settled with its error; False (nothing done) when its prefix finds no free
        blocks while other requests hold them: it is admitted once they are done and their blocks freed. A job
        for a request the engine still computes for an earlier call (given up by the cluster) replaces that call."""
        prefix = None
        stale = self._in_engine.get(job.request_id)
        if stale is not None:  # the request placed here again: the cluster gave up the call still computing it
            self.engine.abort(job.request_id)  # (its engine step outlasted the stall timeout)
            self._settle(stale, error=RuntimeError(f"request {job.request_id!r} was placed on this worker again"))
        try:
            prefix = self.engine.import_kv(job.data) if job.data is not None else None
            self.engine.add_request(job.prompt, job.params, request_id=job.request_id, prefix=prefix, hold_kv=True)
            self._in_engine[job.request_id] = job
        except MemoryError as e:
            if self._in_engine:
                return False
            self._settle(job, error=e)
        except Exception as e:  # noqa: BLE001 - this request's error (a bad prompt), its caller's
            self._settle(job, error=e)
        finally:
            if prefix is not None:
                self.engine.release_prefix(prefix)
        return True

    def _finish(self, job: _Job, out: RequestOutput) -> None:
        """The computed request's KV out of the engine (its caller publishes it), its blocks freed."""
        try:
            kv = self.engine.export_kv(job.request_id)
        except Exception as e:  # noqa: BLE001
            self._settle(job, error=e)
            return
        finally:
            self.engine.release(job.request_id)
        self._settle(job, output=out, kv=kv)

    def _settle(self, job: _Job, output: RequestOutput | None = None, kv: KVExport | None = None,
                error: BaseException | None = None) -> None:
        self._in_engine.pop(job.request_id, None)
        job.output, job.kv, job.error, job.computed_at = output, kv, error, time.perf_counter()
        job.data = None
        if output is not None:  # the busy time since the previous prompt: this one's, and its share of its batch's
            since = self.busy_since
            busy = self.busy_total_s + (0.0 if since is None else time.monotonic() - since)
            job.busy_s, self._busy_at_last_prompt = busy - self._busy_at_last_prompt, busy
        with self._turn:
            job.settled = True
            self.queued_tokens -= len(job.prompt)
            self.served += error is None

    # -- the store -----------------------------------------------------------------------------------
    def _publish(self, rid: str, prompt: list[int], kv: KVExport, leased: bool) -> tuple[list[int], str | None, int]:
        """The prompt's KV into the store and, for a request that goes on to decode, leased to it:
        (keys, lease id, tokens the keys hold). A store that fails means no keys: decode computes it."""
        try:
            t = self.store_timeout_s
            call(self.store, "put", prompt, kv, self.fingerprint, timeout=t)
            held = call(self.store, "match", prompt, False, timeout=t)  # its own blocks: not a hit
            lease = None
            if leased and held.keys:
                lease = call(self.store, "lease", held.keys, self.lease_ttl_s, lease_owner(self.name, rid), timeout=t)
            return held.keys, lease, held.tokens
        except (StoreUnavailable, KeyError):  # not published (or evicted at once): decode computes it
            return [], None, 0

    def _load_prefix(self, prompt: list[int], source=None) -> tuple[KVExport | None, int, int]:
        """(The KV of the prompt's cached prefix or None, its tokens fetched from another node, tokens
        the store held but could not hand over). This node's store first; ``source`` (another node's)
        where it holds more. A store that fails to match or to hand over the blocks costs recomputing
        them, never the request."""
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
            return None, 0, 0
        remote = where is not self.store
        data = self._fetch_or_recompute(best.keys, best.tokens, where if remote else None)
        if data is None:
            return None, 0, best.tokens
        return data, best.tokens if remote else 0, 0

    def load(self) -> dict:
        """``busy_s``: how long the engine's current step has run (the supervisor tells a stuck worker by it)."""
        since = self.busy_since
        return {"name": self.name, "served": self.served, "queued_tokens": self.queued_tokens,
                "busy_s": 0.0 if since is None else time.monotonic() - since, "busy_total_s": self.busy_total_s,
                "warm_up": self.warm_up,
                "free_blocks": self.engine.pool.free_counts(), "capacity": self.engine.pool.capacity,
                "kv_load_failures": self.kv_load_failures,
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
