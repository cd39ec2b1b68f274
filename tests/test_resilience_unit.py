"""Failure handling without Ray: the workers over an in-process store that fails or holds damaged
blocks, the engine loop surviving a failing step, fault points, the Conductor's liveness, the
client-facing error text, health that follows the cluster, and `pdserve status` without a server.
(tests/test_resilience_cluster.py kills real actors.)"""
import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from decode.worker import STEP_FAILED, DecodeWorker
from kvstore.blocks import BlockSpec
from kvstore.errors import StoreUnavailable
from kvstore.faults import Fault, Faults, InjectedFault
from kvstore.index import KVLayout
from kvstore.keys import fingerprint_of
from kvstore.store import KVStore
from model.engine import Engine, EngineConfig, SamplingParams
from model.loader import build, random_state
from model.presets import get_preset
from pdserve.errors import ServeError, client_message, from_worker
from pdserve.gateway import ServerOptions, start
from pdserve.metrics import Metrics
from prefill.worker import PrefillWorker
from protos.pdserve.v1 import pdserve_pb2 as pb
from protos.pdserve.v1 import pdserve_pb2_grpc as pb_grpc
from scheduler.conductor import NO_LIVE_WORKER, Conductor
from scheduler.cost_model import live_cost_model
from scheduler.placement import Placement, PlacementRequest, Reject
from scheduler.policies import make_policy
from test_gateway_unit import FakeCluster
from threads import one_torch_thread

CFG = get_preset("skv-tiny")
ENGINE = EngineConfig(kv_cache_bytes=16 * 2**20, max_seqs=8)


@pytest.fixture(scope="module")
def model():
    """skv-tiny with random weights; one torch thread while these tests run (the workers' engine
    threads and the test share the cores: two intra-op threads on busy cores crawl)."""
    with one_torch_thread():
        yield build(CFG, random_state(CFG, 0))


class FlakyStore(KVStore):
    """An in-process store whose chosen methods fail as a dead store would."""

    failing: set = set()

    def __getattribute__(self, name):
        if name in object.__getattribute__(self, "failing"):
            raise StoreUnavailable(f"KV store: {name} got no answer (test)")
        return object.__getattribute__(self, name)


def workers(model, store):
    fp = fingerprint_of(model)
    return PrefillWorker("p", model, store, fp, ENGINE), DecodeWorker("d", model, store, fp, ENGINE)


def run(prefill, decode, rid, prompt, params):
    handoff = prefill.prefill(rid, prompt, params)
    decode.submit(handoff, params)
    outs = list(decode.stream(rid, timeout_s=60))
    return [t for o in outs for t in o.token_ids], outs[-1], handoff


def alone(model, prompt, params):
    return Engine(model, EngineConfig(kv_cache_bytes=16 * 2**20, max_seqs=1)).generate([prompt], params)[0]


def new_store(model):
    store = FlakyStore(BlockSpec.of(CFG), fingerprint_of(model), KVLayout.of(CFG))
    store.failing = set()
    return store


def test_a_dead_store_costs_cache_hits_never_the_request(model):
    """The issue's store kill: decode's publish raised and killed the engine thread. Now every store
    call failing means prefill recomputes, decode recomputes the prompt's KV, publish is skipped,
    and the loop goes on serving."""
    store = new_store(model)
    prefill, decode = workers(model, store)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    try:
        store.failing = {"put", "match", "get", "get_refs", "lease", "release"}
        for i in range(3):
            prompt = list(range(5 + i, 40 + i))
            tokens, last, handoff = run(prefill, decode, f"r{i}", prompt, params)
            assert last.finished and last.finish_reason == "length"
            assert tokens == alone(model, prompt, params)
            assert handoff.keys == [] and handoff.lease_id is None
        assert decode._thread.is_alive()
        assert decode.load()["publish_failures"] >= 3  # each finished conversation (and running blocks)
        store.failing = set()  # back: the next conversation is cached again
        prompt = list(range(50, 90))
        run(prefill, decode, "r-back", prompt, params)
        assert store.match(prompt, False).tokens >= 32
        assert len(store.leases.live) == 0
    finally:
        decode.shutdown()


def test_a_damaged_block_is_recomputed_never_served(model):
    store = new_store(model)
    prefill, decode = workers(model, store)
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    try:
        first = list(range(7, 60))
        tokens, _, _ = run(prefill, decode, "t1", first, params)
        second = first + tokens + [300, 301]
        m = store.match(second, False)
        assert len(m.keys) >= 3
        assert store.corrupt(m.keys[1])
        tokens2, last, handoff = run(prefill, decode, "t2", second, params)
        assert tokens2 == alone(model, second, params)
        assert handoff.cached_tokens <= 16  # only the block before the damaged one was reused
        assert store.snapshot()["corrupt_blocks"] >= 1
        key = m.keys[1]  # dropped, then stored again by the recompute: sound bytes now
        assert key in store.index and store.host.verified(key, store.host.get(key)[1])
    finally:
        decode.shutdown()


def test_a_failing_transfer_is_recomputed_or_fails_by_policy(model):
    store = new_store(model)
    fp = fingerprint_of(model)
    prefill = PrefillWorker("p", model, store, fp, ENGINE)
    decode = DecodeWorker("d", model, store, fp, ENGINE)
    strict = DecodeWorker("s", model, store, fp, ENGINE, kv_load_failure="fail")
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    try:
        prompt = list(range(9, 50))
        decode.arm_fault("kv.fetch", "raise")
        tokens, _, handoff = run(prefill, decode, "x1", prompt, params)
        assert tokens == alone(model, prompt, params)
        assert decode.load()["kv_load_failures"] == 1 and decode.load()["recomputed_tokens"] == handoff.kv_tokens > 0
        strict.arm_fault("kv.fetch", "raise")
        handoff = prefill.prefill("x2", prompt, params)
        with pytest.raises(Exception, match="kv_load_failure = fail"):
            strict.submit(handoff, params)
        assert len(store.leases.live) == 0  # acknowledged even when the load failed
    finally:
        decode.shutdown()
        strict.shutdown()


def test_a_failing_engine_step_fails_its_batch_and_the_loop_goes_on(model):
    store = new_store(model)
    prefill, decode = workers(model, store)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    try:
        decode.arm_fault("decode.step", "raise", after=3)
        handoffs = [prefill.prefill(f"b{i}", list(range(3 + i, 30)), params) for i in range(3)]
        with decode.lock:  # all three in the batch before the loop steps
            for h in handoffs:
                decode.submit(h, params)
        lasts = [list(decode.stream(f"b{i}", timeout_s=60))[-1] for i in range(3)]
        assert all(o.finished and o.finish_reason == STEP_FAILED for o in lasts)
        assert decode.load()["running"] == 0 and decode.load()["step_failures"] == 1
        free = decode.engine.pool.free_counts()
        assert free == decode.engine.pool.capacity
        short = SamplingParams(max_tokens=4, ignore_eos=True)
        tokens, last, _ = run(prefill, decode, "after", list(range(11, 30)), short)
        assert last.finish_reason == "length" and tokens == alone(model, list(range(11, 30)), short)
    finally:
        decode.shutdown()


def test_fault_points_count_passing_hits_then_fire():
    f = Faults()
    f.arm(Fault("x", "raise", after=2, times=2))
    f.hit("x"), f.hit("x"), f.hit("other")
    for _ in range(2):
        with pytest.raises(InjectedFault, match="injected fault at x"):
            f.hit("x")
    f.hit("x")  # disarmed after two
    assert f.fired == {"x": 2}
    with pytest.raises(ValueError, match="fault action"):
        Fault("x", "explode")


def test_conductor_places_only_on_live_workers_and_forgets_blocks_of_a_reset_store():
    cost = live_cost_model("skv-tiny", None)
    c = Conductor(make_policy("cache_aware", cost), cost, ["p0", "p1"], ["d0"], 16, 0xABC)
    req = lambda i: PlacementRequest(f"r{i}", 40, prompt=tuple(range(40)))
    c.mark_down("p0")
    for i in range(3):
        got = c.place(req(i))
        assert isinstance(got, Placement) and got.prefill == "p1"
        c.finished(f"r{i}")
    c.mark_down("d0")
    assert not c.can_serve() and c.place(req(9)) == Reject(NO_LIVE_WORKER)
    c.mark_up("d0")
    c.mark_up("p0")
    assert c.can_serve()
    got = c.place(req(10))
    c.prefilled("r10", [1, 2], 32, 0)
    assert c.view.prefill_state[got.prefill].cache is not None and 1 in c.view.prefill_state[got.prefill].cache
    c.forget_blocks()
    assert all(1 not in c.view.prefill_state[p].cache for p in ("p0", "p1")) and not c.view.locator.holders


def test_client_messages_never_carry_ray_internals():
    class RayTaskError(Exception):  # what ray.get raises: the worker's exception as .cause
        def __init__(self, cause):
            super().__init__("\x1b[36mray::DecodeActor.submit()\x1b[39m (pid=1, ip=127.0.0.1, actor_id=ab12cd34ef56ab12cd34ef56)\n"
                             "Traceback (most recent call last):\n  File ...")
            self.cause = cause

    bad = [RayTaskError(RuntimeError("boom")), RuntimeError("The actor died unexpectedly: actor_id=ff00ff00ff00ff00ff"),
           RayTaskError(KeyError("r1"))]
    for e in bad:
        code, message = client_message(from_worker(e, "decode worker decode-0"))
        assert code in ("INTERNAL", "UNAVAILABLE") and "decode worker decode-0" in message
        for word in ("ray", "Ray", "actor_id", "Traceback", "\x1b", "ff00ff00"):
            assert word not in message
    code, message = client_message(from_worker(RayTaskError(ValueError("request of up to 9999 tokens can never fit "
                                                                        "the KV pool")), "decode worker d"))
    assert (code, message) == ("INVALID_ARGUMENT", "decode worker d: request of up to 9999 tokens can never fit the "
                                                   "KV pool")
    assert client_message(ValueError("\x1b[31mTraceback ray")) [1].startswith("the cluster failed")
    assert client_message(ServeError("UNAVAILABLE", "no live worker")) == ("UNAVAILABLE", "no live worker")


class FailingCluster(FakeCluster):
    """Serving toggles; streams fail the way a dead Ray actor made them fail before."""

    def __init__(self):
        super().__init__()
        self.up = True

    def serving(self):
        return self.up

    def stream(self, sub):
        yield from list(super().stream(sub))[:2]
        raise RuntimeError("\x1b[31mThe actor died unexpectedly before finishing this task. actor_id=7f3a9c2e11d0"
                           "\nTraceback (most recent call last)")


def test_health_follows_the_cluster_and_a_failed_stream_reads_clean():
    async def main():
        cluster = FailingCluster()
        running = await start(cluster, ServerOptions(), Metrics("skv-tiny"))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
                health = health_pb2_grpc.HealthStub(ch)

                async def status():
                    return (await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)).status

                async def wait_for(want):
                    t0 = time.monotonic()
                    while await status() != want:
                        assert time.monotonic() - t0 < 5, f"health did not become {want}"
                        await asyncio.sleep(0.05)

                assert await status() == health_pb2.HealthCheckResponse.SERVING
                cluster.up = False
                await wait_for(health_pb2.HealthCheckResponse.NOT_SERVING)
                cluster.up = True
                await wait_for(health_pb2.HealthCheckResponse.SERVING)
                stub = pb_grpc.PDServeStub(ch)
                req = pb.GenerateRequest(text="hello", sampling=pb.SamplingParams(max_tokens=6))
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    [r async for r in stub.Generate(req, timeout=10)]
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
                text = e.value.details()
                assert "retry" in text and len(text) < 200
                for word in ("actor", "Traceback", "\x1b", "7f3a9c2e11d0"):
                    assert word not in text
        finally:
            await running.stop(0)

    asyncio.run(main())


def test_status_against_no_server_is_one_line_and_exit_2(tmp_path):
    from test_cli import run as cli

    out = cli("status", "--server", "127.0.0.1:9", timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and "no answer from 127.0.0.1:9" in out.stderr
    out = cli("status", "--state-file", str(tmp_path / "none.json"), timeout=60)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "no running server" in out.stderr


def test_gauges_and_counters_follow_a_failure():
    """Right after a decode worker dies its batch leaves the running gauge, the worker counts as
    restarting, and the failure counters advance by what the cluster adds (never backwards)."""
    from prometheus_client import generate_latest

    m = Metrics("skv-tiny")

    def status(state, running, restarts, migrations):
        return {"serving": state == "alive",
                "workers": {"prefill-0": {"role": "prefill", "state": "alive", "restarts": 0},
                            "decode-0": {"role": "decode", "state": state, "restarts": restarts,
                                         **({"running": running, "waiting": 0} if state == "alive" else {})}},
                "store": {"state": "alive", "restarts": 0},
                "counters": {"migrations": migrations, "recomputed_tokens": 3 * migrations, "kv_load_failures": 0}}

    def value(name, **labels):
        return m.registry.get_sample_value(name, {"model_name": "skv-tiny", **labels})

    m.update_cluster(status("alive", 8, 0, 0))
    assert value("pdserve:num_requests_running") == 8 and value("pdserve:cluster_serving") == 1
    m.update_cluster(status("restarting", 0, 0, 0))
    assert value("pdserve:num_requests_running") == 0 and value("pdserve:cluster_serving") == 0
    assert value("pdserve:workers", role="decode", state="restarting") == 1
    assert value("pdserve:workers", role="decode", state="alive") == 0
    m.update_cluster(status("alive", 8, 1, 8))
    m.update_cluster(status("alive", 8, 1, 8))  # the same totals again: no double count
    assert value("pdserve:worker_restarts_total", role="decode") == 1
    assert value("pdserve:request_migrations_total") == 8 and value("pdserve:recomputed_tokens_total") == 24
    assert b"pdserve:kv_load_failures_total" in generate_latest(m.registry)


def test_a_request_cancelled_while_decode_refuses_it_ends_as_an_abort():
    """The abort storm's race, made deterministic: the cancel lands between prefill and decode's
    answer, and decode refuses (full); the request must end as an abort, not as decode's error."""
    from types import SimpleNamespace

    from kvstore.handoff import Handoff
    from pdserve.driver import Counters, RequestFlow, Submitted
    from pdserve.errors import ServeError
    from scheduler.placement import Placement

    flow = object.__new__(RequestFlow)
    finished = []
    flow._cancelled = set()
    flow.conductor = SimpleNamespace(finished=finished.append, prefilled=lambda *a: None)
    flow.counters = Counters()
    flow.resilience = SimpleNamespace(stall_timeout_s=5.0)
    handoff = Handoff("r1", [1, 2, 3], 7, None, [11], 3, "lease-1", 0)
    flow._prefill = lambda *a: handoff
    flow._source_for = lambda *a, **k: None
    flow._drain_store_events = flow._replicate = lambda: None
    released = []
    flow._release = lambda h, p: released.append(h.lease_id)

    def refuse(*args):  # decode is asked; meanwhile the client cancels; then decode says it is full
        flow._cancelled.add("r1")
        return "ref"

    def get(ref, timeout=None):
        raise ServeError("not enough free KV blocks to import into groups [0]")

    flow.decode = {"decode-0": SimpleNamespace(submit=SimpleNamespace(remote=refuse))}
    flow.ray = SimpleNamespace(get=get, exceptions=SimpleNamespace(
        RayActorError=KeyError, GetTimeoutError=KeyError, ObjectLostError=KeyError, ActorUnschedulableError=KeyError))
    sub = Submitted("r1", Placement(prefill="prefill-0", decode="decode-0"), None)
    assert flow._run(sub, [1, 2, 3], SamplingParams(max_tokens=4)) is handoff
    assert finished == ["r1"] and released == ["lease-1"]
    flow._cancelled.clear()  # not cancelled: decode's refusal is the request's error, as before
    flow.decode["decode-0"].submit.remote = lambda *a: "ref"
    flow._forget = lambda rid: None
    with pytest.raises(ServeError, match="decode worker decode-0"):
        flow._run(sub, [1, 2, 3], SamplingParams(max_tokens=4))
