"""A long engine step is not a lost worker: both workers' ``load()`` (what the supervisor's ping
returns) answers while their engine is inside a step, and reports how long that step has run
(``busy_s``); the supervisor takes a worker out of placement only when one step has outrun
``stuck_s``, and puts it back once a ping finds its engine between steps.
(tests/test_liveness_cluster.py checks the same through Ray.)"""
import threading
import time
from types import SimpleNamespace

import pytest

from decode.worker import DecodeWorker
from kvstore.blocks import BlockSpec
from kvstore.index import KVLayout
from kvstore.keys import fingerprint_of
from kvstore.store import KVStore
from model.engine import EngineConfig, SamplingParams
from model.loader import build, random_state
from model.presets import get_preset
from pdserve.supervisor import Member, Supervisor
from prefill.worker import PrefillWorker
from threads import one_torch_thread

CFG = get_preset("skv-tiny")
ENGINE = EngineConfig(kv_cache_bytes=16 * 2**20, max_seqs=8)
PARAMS = SamplingParams(max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    with one_torch_thread():
        yield build(CFG, random_state(CFG, 0))


@pytest.fixture
def store(model):
    return KVStore(BlockSpec.of(CFG), fingerprint_of(model), KVLayout.of(CFG))


def hold_steps(engine) -> tuple[threading.Event, threading.Event]:
    """Makes ``engine.step`` wait, once inside, until released: (entered, release)."""
    entered, release, step = threading.Event(), threading.Event(), engine.step

    def held_step():
        entered.set()
        assert release.wait(30), "the test never released the step"
        return step()

    engine.step = held_step
    return entered, release


def load_beside(worker) -> dict:
    """``worker.load()`` from another thread; fails if it does not answer within 5 s."""
    got: dict = {}
    reader = threading.Thread(target=lambda: got.update(worker.load()), daemon=True)
    reader.start()
    reader.join(5)
    assert not reader.is_alive(), "load() waited for the engine step"
    return got


def test_decode_load_answers_while_a_step_runs(model, store):
    fp = fingerprint_of(model)
    prefill, decode = PrefillWorker("p", model, store, fp, ENGINE), DecodeWorker("d", model, store, fp, ENGINE)
    try:
        entered, release = hold_steps(decode.engine)
        decode.submit(prefill.prefill("r", list(range(3, 60)), PARAMS), PARAMS)
        assert entered.wait(30)
        during = load_beside(decode)  # the engine loop holds the engine lock and sits in the step
        assert during["running"] + during["waiting"] == 1 and during["busy_s"] > 0
        release.set()
        outs = list(decode.stream("r", timeout_s=60))
        assert outs[-1].finished and sum(len(o.token_ids) for o in outs) == PARAMS.max_tokens
        assert decode.load()["busy_s"] < 1.0  # between steps (or in a step of a few ms)
    finally:
        release.set()
        decode.shutdown()


def test_prefill_load_reports_the_step_in_progress(model, store):
    prefill = PrefillWorker("p", model, store, fingerprint_of(model), ENGINE)
    assert prefill.load()["busy_s"] == 0.0
    entered, release = hold_steps(prefill.engine)
    call = threading.Thread(target=prefill.prefill, args=("r", list(range(3, 60)), PARAMS), daemon=True)
    call.start()
    try:
        assert entered.wait(30)
        during = load_beside(prefill)
        assert during["busy_s"] > 0 and during["queued_tokens"] == 57
    finally:
        release.set()
        call.join(30)
    assert not call.is_alive() and prefill.load()["busy_s"] == 0.0 and prefill.served == 1


def test_supervisor_takes_a_stuck_worker_out_and_back():
    downs, ups = [], []
    member = Member("decode-0", "decode", handle=None, incarnation="a")
    sup = Supervisor([member], downs.append, lambda m: ups.append(m.name) or True, lambda name: None, stuck_s=5.0)
    sup._answered(member, {"incarnation": "a", "busy_s": 4.0})  # a long step: still alive
    assert member.state == "alive" and downs == [] and member.load["busy_s"] == 4.0
    sup._answered(member, {"incarnation": "a", "busy_s": 6.0})  # one step longer than stuck_s
    assert member.state == "stuck" and downs == ["decode-0"] and sup.live("decode") == []
    sup._answered(member, {"incarnation": "a", "busy_s": 0.0})  # between steps again
    assert member.state == "alive" and ups == ["decode-0"] and member.restarts == 0
    no_rule = Member("decode-1", "decode", handle=None)
    Supervisor([no_rule], downs.append, lambda m: True, lambda name: None)._answered(no_rule, {"busy_s": 1e6})
    assert no_rule.state == "alive"  # without stuck_s, a step of any length is a live worker


def test_pdserve_status_shows_a_stuck_worker_and_its_step(capsys, monkeypatch):
    import pdserve.server_cli as cli
    from pdserve.gateway import status_message

    workers = {"prefill-0": {"queued_tokens": 0, "free_blocks": 4, "state": "alive", "busy_s": 0.2},
               "decode-0": {"running": 3, "waiting": 0, "free_blocks": 4, "capacity": 8, "state": "stuck",
                            "busy_s": 42.5}}
    status = status_message("skv-tiny", {"workers": workers})  # what ClusterStatus sends
    assert [w.step_s for w in status.workers] == [0.2, 42.5]
    monkeypatch.setattr(cli, "_client", lambda args: SimpleNamespace(status=lambda: status))
    assert cli._status(SimpleNamespace()) == 0
    lines = capsys.readouterr().out.splitlines()
    decode = next(line for line in lines if "decode-0" in line)
    assert " stuck " in decode and decode.endswith("in one step for 42.5 s")
    assert "in one step" not in next(line for line in lines if "prefill-0" in line)  # a short step: not shown


def test_a_prefill_placed_again_replaces_the_call_given_up(model, store):
    """The cluster gave up a prefill call whose step outlasted the stall timeout and placed the request on the
    same worker again while the old call still computes it: the old call ends with an error (nobody waits for
    it), the new one gets the first token the prompt gets alone."""
    prefill = PrefillWorker("p", model, store, fingerprint_of(model), ENGINE)
    long_prompt = [(7 * j) % 300 + 3 for j in range(600)]  # two steps of 512 tokens
    entered, release = hold_steps(prefill.engine)
    got: dict = {}

    def call(name):
        try:
            got[name] = prefill.prefill("r", long_prompt, PARAMS)
        except Exception as e:  # noqa: BLE001
            got[name] = e

    old = threading.Thread(target=call, args=("old",), daemon=True)
    old.start()
    assert entered.wait(30)
    new = threading.Thread(target=call, args=("new",), daemon=True)
    new.start()
    while prefill.queued_tokens < 2 * len(long_prompt):  # the new call is queued
        time.sleep(0.01)
    release.set()
    old.join(60)
    new.join(60)
    assert isinstance(got["old"], RuntimeError) and "placed on this worker again" in str(got["old"])
    alone = PrefillWorker("q", model, KVStore(BlockSpec.of(CFG), fingerprint_of(model), KVLayout.of(CFG)),
                          fingerprint_of(model), ENGINE).prefill("r", long_prompt, PARAMS)
    assert got["new"].first_token == alone.first_token and got["new"].kv_tokens == alone.kv_tokens
    assert prefill.queued_tokens == 0 and prefill.engine.pool.free_counts() == prefill.engine.pool.capacity


def test_metrics_show_a_stuck_worker_and_how_long_its_step_has_run():
    from pdserve.metrics import Metrics

    m = Metrics("skv-tiny")
    m.update_cluster({"workers": {"prefill-0": {"role": "prefill", "state": "alive", "busy_s": 0.0},
                                  "decode-0": {"role": "decode", "state": "stuck", "busy_s": 42.5}}})

    def value(name, **labels):
        return m.registry.get_sample_value(name, {"model_name": "skv-tiny", **labels})

    assert value("pdserve:workers", role="decode", state="stuck") == 1
    assert value("pdserve:workers", role="decode", state="alive") == 0
    assert value("pdserve:worker_step_seconds", worker="decode-0") == 42.5
    assert value("pdserve:worker_step_seconds", worker="prefill-0") == 0.0


def test_the_dashboard_json_carries_each_workers_step():
    from pdserve.dashboard import Dashboard

    door = SimpleNamespace(limits=SimpleNamespace(model="skv-tiny"), serving=False, live={},
                           metrics=SimpleNamespace(recent=SimpleNamespace(percentiles=lambda: {})))
    shaped = Dashboard(door).shape({"workers": {"decode-0": {"role": "decode", "state": "stuck", "busy_s": 42.46}}})
    assert [(w["name"], w["state"], w["step_s"]) for w in shaped["workers"]] == [("decode-0", "stuck", 42.5)]
