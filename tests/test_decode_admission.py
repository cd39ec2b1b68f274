"""The decode worker takes handoffs whose KV does not fit its pool yet (decode/worker.py): they wait,
oldest first, until running requests free their blocks, then decode to the tokens each prompt gets
alone; a waiting request can be cancelled; only a request larger than the whole pool is refused."""
import dataclasses

import pytest

from decode.worker import DecodeWorker
from kvstore.blocks import BlockSpec
from kvstore.index import KVLayout
from kvstore.keys import fingerprint_of
from kvstore.store import KVStore
from model.engine import Engine, EngineConfig, SamplingParams
from model.loader import build, random_state
from model.presets import get_preset
from prefill.worker import PrefillWorker
from threads import one_torch_thread

CFG = get_preset("skv-tiny")
PARAMS = SamplingParams(max_tokens=24, ignore_eos=True)
SMALL = EngineConfig(num_blocks=24, max_seqs=8)  # 24 blocks of 16 tokens a group: two requests below at once


@pytest.fixture(scope="module")
def model():
    with one_torch_thread():
        yield build(CFG, random_state(CFG, 0))


@pytest.fixture
def pair(model):
    fp = fingerprint_of(model)
    store = KVStore(BlockSpec.of(CFG), fp, KVLayout.of(CFG))
    prefill = PrefillWorker("p", model, store, fp, EngineConfig(kv_cache_bytes=16 * 2**20, max_seqs=8))
    decode = DecodeWorker("d", model, store, fp, SMALL)
    yield prefill, decode
    decode.shutdown()


def prompt(i: int, n: int = 150) -> list[int]:
    return [(i * 7 + j) % 200 + 1 for j in range(n)]


def tokens_of(decode: DecodeWorker, rid: str):
    outs = list(decode.stream(rid, timeout_s=60))
    return [t for o in outs for t in o.token_ids], outs[-1].finish_reason


def assert_clean(decode: DecodeWorker) -> None:
    with decode.lock:
        assert decode.engine.pool.free_counts() == decode.engine.pool.capacity
        assert not decode.engine.sequences and not decode.pending and not decode.published


def test_handoffs_beyond_the_pool_wait_and_decode_as_alone(pair, model):
    prefill, decode = pair
    handoffs = [prefill.prefill(f"r{i}", prompt(i), PARAMS) for i in range(6)]
    for h in handoffs:  # all at once: the third already finds the pool full
        decode.submit(h, PARAMS)
    assert decode.load()["waiting"] >= 1
    alone = Engine(model, EngineConfig(kv_cache_bytes=16 * 2**20, max_seqs=1))
    for i, h in enumerate(handoffs):
        got, reason = tokens_of(decode, h.request_id)
        assert reason == "length" and got == alone.generate([prompt(i)], PARAMS)[0]
    assert_clean(decode)


def test_a_handoff_waits_rather_than_preempt_a_running_request(pair):
    """A at 159 of 160 tokens of its last block, B's KV exactly the free blocks: taking B now would
    leave A no block for its next token (a preemption: A or B recomputed). B must wait for A instead.
    The engine is stepped by hand here (loop stopped) so that the order is fixed."""
    prefill, decode = pair
    decode.shutdown()
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    a, b = (prefill.prefill(rid, prompt(i, n), params) for rid, i, n in (("a", 0, 159), ("b", 1, 222)))
    decode.submit(a, params)
    decode._step()  # A's first decode step: 10 blocks of group 3 held, 14 free
    decode.submit(b, params)  # B's KV takes 14 blocks of group 3
    c = dataclasses.replace(prefill.prefill("c", prompt(2, 40), params), keys=[], kv_tokens=0, lease_id=None)
    decode.submit(c, params)  # no KV to load (computed here): it still queues behind B
    assert [p.rid for p in decode.pending] == ["b", "c"]
    done = set()
    while decode.engine.has_work() or decode.pending:
        done |= {o.request_id for _, o in decode._step() or [] if o.finished}
        assert "b" not in decode.engine.sequences or "a" in done  # B admitted only once A is done
        assert "c" not in decode.engine.sequences or "b" in decode.engine.sequences or "b" in done
    assert done == {"a", "b", "c"} and decode.engine.scheduler.preemptions == 0
    assert_clean(decode)


def test_a_waiting_handoff_can_be_cancelled(pair):
    prefill, decode = pair
    decode.shutdown()  # stepped by hand: the two first ones are still running when the last is cancelled
    handoffs = [prefill.prefill(f"c{i}", prompt(i), PARAMS) for i in range(4)]
    for h in handoffs:
        decode.submit(h, PARAMS)
    assert [p.rid for p in decode.pending] == ["c2", "c3"]
    assert decode.cancel("c3") and [p.rid for p in decode.pending] == ["c2"]
    assert decode.load()["waiting"] == 3  # c0 and c1 in the engine, not stepped yet; c2 waiting for room
    done = set()
    while decode.engine.has_work() or decode.pending:
        done |= {o.request_id for _, o in decode._step() or [] if o.finished}
    assert done == {"c0", "c1", "c2"}
    got, reason = tokens_of(decode, "c3")
    assert reason == "abort" and len(got) == 1  # the first token (from prefill) was streamed at submit
    assert_clean(decode)


def test_a_request_larger_than_the_whole_pool_is_refused_at_once(model):
    fp = fingerprint_of(model)
    store = KVStore(BlockSpec.of(CFG), fp, KVLayout.of(CFG))
    prefill = PrefillWorker("p", model, store, fp, EngineConfig(kv_cache_bytes=16 * 2**20, max_seqs=8))
    decode = DecodeWorker("d", model, store, fp, EngineConfig(num_blocks=8, max_seqs=8))
    try:
        params = SamplingParams(max_tokens=2, ignore_eos=True)
        handoff = prefill.prefill("big", prompt(0, 200), params)
        with pytest.raises(ValueError, match="never fit the KV pool: needs 13 KV blocks in group 0 but the pool"):
            decode.submit(handoff, params)
        assert "big" not in decode.streams
        assert_clean(decode)
    finally:
        decode.shutdown()


def test_the_engine_lock_serves_threads_in_the_order_they_asked():
    """The engine loop lets go of the lock and takes it again at once after each step; the threads that
    asked meanwhile (a submit, a cancel, the supervisor's ping) must get it first."""
    import threading
    import time

    from decode.fair_lock import FairLock

    lock, order = FairLock(), []

    def ask(name):
        with lock:
            order.append(name)

    lock.acquire()  # the engine loop, stepping
    askers = []
    for name in ("submit", "ping"):
        askers.append(threading.Thread(target=ask, args=(name,)))
        askers[-1].start()
        time.sleep(0.2)  # each one waiting before the next asks
    lock.release()
    ask("loop")  # the loop's next step, asked for right after letting go
    for t in askers:
        t.join(timeout=10)
    assert order == ["submit", "ping", "loop"]
    with lock, lock:  # taken again by the thread that holds it (tests and nested calls do)
        pass
    with pytest.raises(RuntimeError, match="does not hold it"):
        lock.release()


def test_a_request_placed_here_again_replaces_the_placement_given_up(pair, model):
    """The cluster gave a placement up (its stream silent past the stall timeout, e.g. a stuck step) and
    placed the request here again: the new handoff replaces the old one, which ends as an abort; the new
    stream gets the tokens the prompt gets alone, and nothing of either is left after."""
    prefill, decode = pair
    p = prompt(3, 60)
    h = prefill.prefill("r", p, PARAMS)
    decode.submit(h, PARAMS)
    old = decode.stream("r", timeout_s=60)
    assert next(old).token_ids == [h.first_token]
    decode.submit(prefill.prefill("r", p, PARAMS), PARAMS)  # (was: ValueError, "already being decoded here")
    new = decode.stream("r", timeout_s=60)
    first = next(new)
    assert list(old)[-1].finish_reason == "abort"  # the old stream ends, and leaves the new one's queue alone
    outs = [first, *new]
    alone = Engine(model, EngineConfig(kv_cache_bytes=16 * 2**20, max_seqs=1)).generate([p], PARAMS)[0]
    assert [t for o in outs for t in o.token_ids] == alone and outs[-1].finish_reason == "length"
    assert_clean(decode)
    assert "r" not in decode.streams
