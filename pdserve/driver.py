"""One request's way through the cluster, surviving the workers it meets.

placement -> prefill (first token, KV into the store, a lease) -> decode admission -> token stream.
When a worker is lost on the way (its process died, Ray is restarting it, or it stopped answering):
- before or during prefill, or at decode admission: the request is placed again (the Conductor has
  taken the lost worker out of placement) and starts over, reusing whatever prefix the store holds;
- mid-stream (request migration): the prompt plus the tokens streamed so far become the new
  prompt, the rest of ``max_tokens`` the new budget, and the request is placed again. The new prefill
  reuses the blocks the store still holds (the decode worker publishes each block as it fills) and
  recomputes the rest; its first token is the next one of the stream, so the caller sees no token
  twice and none missing. Greedy output is what an undisturbed run gives: the default int8 path is
  batch-invariant, so computing the replayed tokens as a prompt yields the same KV and logits.
  (Seeded sampling restarts its random stream at a move: valid samples, not the same ones.)
A new request that finds no live prefill or decode worker waits up to ``admission_wait_s`` for one
(a worker being restarted) before it is refused. Each request moves at most ``max_migrations`` times; it waits at most ``recovery_timeout_s`` for a
live worker; a decode worker silent for ``stall_timeout_s`` counts as lost (a request queued in a
worker that is still stepping gets keep-alives, so a long queue is not silence), and so does a prefill
worker whose engine has been in one step that long (``stuck``). Every failure ends in a
``ServeError`` with a short message of ours.

A mixin of ``pdserve.cluster.LocalCluster`` (it reads the cluster's actors, Conductor and supervisor).
"""
from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

from kvstore.handoff import Handoff, lease_owner
from model.engine import RequestOutput, SamplingParams
from pdserve.errors import ServeError, from_worker
from scheduler.conductor import NO_LIVE_WORKER
from scheduler.placement import Placement, PlacementRequest, Reject


class Rejected(RuntimeError):
    """The placement policy refused the request (early rejection); ``reason`` says why."""

    def __init__(self, request_id: str, reason: str, retry_after_s: float | None = None):
        super().__init__(f"request {request_id} rejected: {reason}")
        self.request_id, self.reason, self.retry_after_s = request_id, reason, retry_after_s


class WorkerLost(Exception):
    """A worker died, is restarting, or stopped answering while serving a request. ``suspect`` is
    off where the worker answers but lost the request (a restarted one): it stays in placement."""

    def __init__(self, name: str, suspect: bool = True):
        super().__init__(name)
        self.name, self.suspect = name, suspect


@dataclass
class Submitted:
    request_id: str
    placement: Placement
    handoff: Future  # -> Handoff, once prefill is done and decode has the request
    prompt: list[int] = field(default_factory=list)
    params: SamplingParams = field(default_factory=SamplingParams)
    session_id: str | None = None
    migrations: int = 0  # times it moved to another worker


@dataclass
class Counters:
    """Cluster-wide failure counters (the gateway exports them as Prometheus counters)."""

    migrations: int = 0  # mid-stream moves to another decode worker
    replacements: int = 0  # re-placements before streaming (prefill or decode admission lost)
    recomputed_tokens: int = 0  # tokens whose KV existed but was lost and computed again
    kv_load_failures: int = 0  # KV fetches that failed, timed out or failed their checksum
    store_resets: int = 0  # times the store came back empty
    nodes_lost: int = 0  # Ray nodes that left the cluster with their workers and store
    replications: int = 0  # hot prefixes copied to another node's store
    replication_failures: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **deltas: int) -> None:
        with self.lock:
            for k, v in deltas.items():
                setattr(self, k, getattr(self, k) + v)

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "lock"}


def _lost(ray, error: BaseException) -> bool:
    """Whether a Ray call failed because its actor is gone or late (as opposed to the request)."""
    return isinstance(error, (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError,
                              ray.exceptions.ObjectLostError, ray.exceptions.ActorUnschedulableError))


class RequestFlow:
    # -- admission ---------------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams = SamplingParams(), session_id: str | None = None,
               request_id: str | None = None, ttft_slo_s: float | None = None, tbt_slo_s: float | None = None,
               priority: int = 0) -> Submitted:
        rid = request_id or f"r{next(self._ids)}"
        if rid in self._live:  # (a worker takes a request id it holds as the same request placed again)
            raise ServeError("ALREADY_EXISTS", f"request_id: {rid!r} is in flight")
        request = PlacementRequest(rid, len(prompt), session_id, ttft_slo_s, tbt_slo_s, priority, tuple(prompt))
        deadline = time.monotonic() + self.resilience.admission_wait_s
        while not self.conductor.can_serve() and time.monotonic() < deadline:  # a worker is restarting
            time.sleep(0.05)
        placement = self.conductor.place(request)
        if isinstance(placement, Reject):
            if placement.reason == NO_LIVE_WORKER:
                raise ServeError("UNAVAILABLE", "no live prefill or decode worker right now (one is restarting); "
                                                "retry in a few seconds")  # after admission_wait_s
            raise Rejected(rid, placement.reason, placement.retry_after_s)
        sub = Submitted(rid, placement, Future(), list(prompt), params, session_id)
        with self._lock:
            self._live[rid] = sub
        sub.handoff = self._pool.submit(self._run, sub, sub.prompt, params)
        return sub

    def _place_again(self, sub: Submitted, lost: str, prompt: list[int], suspect: bool = True) -> None:
        """``lost`` failed this request: out of placement (until it answers again) and the request on
        a live pair, waiting for one up to ``recovery_timeout_s``."""
        if suspect:
            self.supervisor.suspect(lost)
        self.conductor.finished(sub.request_id)
        sub.migrations += 1
        if sub.migrations > self.resilience.max_migrations:
            raise ServeError("UNAVAILABLE", f"worker {lost} was lost and this request already moved "
                                            f"{self.resilience.max_migrations} times; retry it")
        deadline = time.monotonic() + self.resilience.recovery_timeout_s
        request = PlacementRequest(sub.request_id, len(prompt), sub.session_id, prompt=tuple(prompt))
        while True:
            if sub.request_id in self._cancelled:
                return
            got = self.conductor.place(request) if self.conductor.can_serve() else None  # (no idle counting)
            if isinstance(got, Placement):
                sub.placement = got
                return
            if time.monotonic() > deadline:
                raise ServeError("UNAVAILABLE", f"worker {lost} was lost and no live worker took the request "
                                                f"over within {self.resilience.recovery_timeout_s:g}s; retry later")
            time.sleep(0.1)

    # -- prefill and decode admission --------------------------------------------------------------
    def _run(self, sub: Submitted, prompt: list[int], params: SamplingParams) -> Handoff:
        """Prefill, then hand the request to its decode worker; placed again when either is lost."""
        ray, rid = self.ray, sub.request_id
        while True:
            p, d = sub.placement.prefill, sub.placement.decode
            if rid in self._cancelled:  # cancelled before prefill: nothing was taken yet
                self.conductor.finished(rid)
                return Handoff(rid, list(prompt), None, "abort", [], 0, None, 0)
            try:
                handoff = self._prefill(p, rid, prompt, params, self._source_for(p, node=sub.placement.fetch_from))
            except WorkerLost:
                self._release_orphan(p, rid)
                self._place_again(sub, p, prompt)
                self.counters.add(replacements=1)
                continue
            except BaseException:
                self._release_orphan(p, rid)
                self.conductor.finished(rid)
                raise
            self.counters.add(recomputed_tokens=handoff.recomputed_tokens,
                              kv_load_failures=int(handoff.recomputed_tokens > 0))
            self.conductor.prefilled(rid, handoff.keys, handoff.kv_tokens, handoff.cached_tokens, handoff.busy_s,
                                     handoff.remote_tokens, handoff.timings.get("load_prefix"))
            self._drain_store_events()
            self._replicate()
            if handoff.finish_reason is not None or rid in self._cancelled:
                self.conductor.finished(rid)
            if rid in self._cancelled:  # cancelled while prefilling: give back the lease, go no further
                self._release(handoff, p)
                return handoff
            try:
                got = ray.get(self.decode[d].submit.remote(handoff, params, self._source_for(d, p)),
                              timeout=self.resilience.stall_timeout_s)
            except BaseException as e:  # decode refused or is lost: free the lease and the Conductor's slot
                self._release(handoff, p)
                if rid in self._cancelled:  # cancelled while decode was being asked: it ends as an abort,
                    self.conductor.finished(rid)  # whatever decode said (stream() reports it)
                    return handoff
                if _lost(ray, e):
                    self._place_again(sub, d, prompt)
                    self.counters.add(replacements=1)
                    continue
                self.conductor.finished(rid)
                self._forget(rid)
                raise from_worker(e, f"decode worker {d}") from None
            if got:
                self.counters.add(recomputed_tokens=got.get("recomputed_tokens", 0),
                                  kv_load_failures=int(got.get("recomputed_tokens", 0) > 0))
            return handoff

    def _prefill(self, name: str, rid: str, prompt: list[int], params: SamplingParams, source=None) -> Handoff:
        """The prefill call's handoff. A long prompt takes as long as it takes, but a worker whose engine has
        been in one step longer than ``stall_timeout_s`` (the supervisor's ``stuck``) has lost the request:
        it is placed again, and whatever lease the abandoned call takes when it ends is given back."""
        ray = self.ray
        ref = self.prefill[name].prefill.remote(rid, prompt, params, source)
        try:
            while not ray.wait([ref], timeout=0.25)[0]:
                if self.supervisor.state(name) == "stuck":
                    threading.Thread(target=self._release_abandoned, args=(ref, name), daemon=True).start()
                    raise WorkerLost(name, suspect=False)  # (already out of placement)
            return ray.get(ref)
        except WorkerLost:
            raise
        except BaseException as e:
            if _lost(ray, e):
                raise WorkerLost(name) from None
            raise from_worker(e, f"prefill worker {name}") from None

    def _release_abandoned(self, ref, prefill: str) -> None:
        """Waits for a prefill call the request gave up on; its lease, if it took one, goes back."""
        try:
            handoff = self.ray.get(ref, timeout=self.resilience.recovery_timeout_s + self.resilience.stall_timeout_s)
        except Exception:  # noqa: BLE001 - failed or still stuck: its lease (if any) expires by itself
            return
        self._release(handoff, prefill)

    def _release(self, handoff: Handoff, prefill: str) -> None:
        """Give back the lease the prefill worker took in its node's store."""
        if handoff.lease_id:
            try:
                self.ray.get(self._store_of(prefill).release.remote(handoff.lease_id),
                             timeout=self.resilience.store_timeout_s)
            except Exception:  # noqa: BLE001 - the lease expires by itself
                pass

    def _release_orphan(self, prefill: str, rid: str) -> None:
        """A prefill call that failed (its worker lost, or an error after its work) may have left the request's
        lease behind: nobody has its id, so release it by owner (else it pins its blocks until it expires)."""
        try:
            self.ray.get(self._store_of(prefill).release_owned.remote(lease_owner(prefill, rid)),
                         timeout=self.resilience.store_timeout_s)
        except Exception:  # noqa: BLE001 - the lease expires by itself
            pass

    # -- the stream --------------------------------------------------------------------------------
    def stream(self, sub: Submitted) -> Iterator[RequestOutput]:
        """The request's outputs, moving it to another decode worker if its own is lost mid-stream."""
        sub.handoff.result()  # prefill done, decode has the request (or it was cancelled)
        rid = sub.request_id
        if rid in self._cancelled:  # (cancel also reached the decode worker, if it had the request)
            self.conductor.finished(rid)
            self._forget(rid)
            yield RequestOutput(rid, [], finished=True, finish_reason="abort")
            return
        streamed: list[int] = []
        finished = False
        try:
            while True:
                if rid in self._cancelled:
                    yield RequestOutput(rid, [], finished=True, finish_reason="abort")
                    return
                lost = None
                for out in self._decode_stream(sub):
                    if isinstance(out, WorkerLost):
                        lost = out
                        break
                    streamed.extend(out.token_ids)
                    out.prompt_tokens, out.completion_tokens = len(sub.prompt), len(streamed)
                    finished = out.finished and out.finish_reason != "abort"
                    yield out
                    if out.finished:
                        return
                if rid not in self._cancelled:
                    self._migrate(sub, lost, streamed)
        finally:
            # the decode worker publishes the KV of prompt + answer (the last token has none yet)
            self.conductor.finished(rid, sub.prompt + streamed[:-1] if finished else None)
            self._forget(rid)

    def _decode_stream(self, sub: Submitted):
        """Outputs from the request's current decode worker, then a ``WorkerLost`` if it is lost
        (died, restarting, silent for ``stall_timeout_s``, or failed the batch)."""
        ray, name = self.ray, sub.placement.decode
        gen = self.decode[name].stream.options(num_returns="streaming").remote(sub.request_id)
        while True:
            ready, _ = ray.wait([gen], timeout=self.resilience.stall_timeout_s)
            if not ready:  # alive maybe, but silent: free what it may hold, then move on
                self.ray_cancel(name, sub.request_id)
                yield WorkerLost(name)
                return
            try:
                out = ray.get(next(gen), timeout=self.resilience.stall_timeout_s)
            except StopIteration:
                yield WorkerLost(name)
                return
            except BaseException as e:
                if isinstance(getattr(e, "cause", None), KeyError):  # it answers, restarted: forgot the request
                    yield WorkerLost(name, suspect=False)
                    return
                if _lost(ray, e):
                    yield WorkerLost(name)
                    return
                raise from_worker(e, f"decode worker {name}") from None
            if out.finish_reason and out.finish_reason.startswith("error"):
                yield WorkerLost(name)  # its engine failed this batch: try the request elsewhere
                return
            if out.finished or out.token_ids or out.text:  # (else a keep-alive: waiting, not stalled)
                yield out

    def _migrate(self, sub: Submitted, lost: WorkerLost, streamed: list[int]) -> None:
        """Prompt + streamed tokens as the new prompt, placed on a live pair (prefill reuses what
        the store holds); the next output of the new decode worker is the stream's next token."""
        if not lost.suspect:  # alive: make sure it holds nothing of the request any more
            self.ray_cancel(lost.name, sub.request_id)
        prompt = sub.prompt + streamed
        rest = dataclasses.replace(sub.params, max_tokens=sub.params.max_tokens - len(streamed))
        self._place_again(sub, lost.name, prompt, lost.suspect)
        if sub.request_id in self._cancelled:
            return
        self.counters.add(migrations=1)
        handoff = self._run(sub, prompt, rest)
        if sub.request_id in self._cancelled:  # cancelled while it moved: the new worker lets it go too
            self.ray_cancel(sub.placement.decode, sub.request_id)
        if handoff.finish_reason != "abort":  # (cancelled before its prefill: nothing was computed)
            self.counters.add(recomputed_tokens=max(0, len(prompt) - handoff.cached_tokens))

    def ray_cancel(self, name: str, request_id: str) -> None:
        """Best effort: a worker that is alive frees the request's slots; a lost one has nothing."""
        try:
            self.ray.get(self.decode[name].cancel.remote(request_id), timeout=2.0)
        except Exception:  # noqa: BLE001
            pass

    # -- the rest of the request API ---------------------------------------------------------------
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
            self.ray_cancel(sub.placement.decode, request_id)
