"""The prefill worker batches concurrent calls (prefill/worker.py): each call gets the handoff it would
get alone (first token, keys, the same KV bits in the store), a bad request or a failing step fails only
the calls it concerns, and nothing is left behind (blocks, leases)."""
import threading

import numpy as np
import pytest

from kvstore.blocks import BlockSpec
from kvstore.index import KVLayout
from kvstore.keys import fingerprint_of
from kvstore.store import KVStore
from model.engine import EngineConfig, SamplingParams
from model.loader import build, random_state
from model.presets import get_preset
from prefill.worker import PrefillWorker
from threads import one_torch_thread

CFG = get_preset("skv-tiny")
ENGINE = EngineConfig(kv_cache_bytes=16 * 2**20, max_seqs=8, max_batched_tokens=96)
PARAMS = SamplingParams(max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    with one_torch_thread():
        yield build(CFG, random_state(CFG, 0))


def new_worker(model) -> PrefillWorker:
    store = KVStore(BlockSpec.of(CFG), fingerprint_of(model), KVLayout.of(CFG))
    return PrefillWorker("p", model, store, fingerprint_of(model), ENGINE)


def batch_sizes(worker: PrefillWorker) -> list[int]:
    """Records how many requests each engine step of ``worker`` holds."""
    seen, step = [], worker.engine.step

    def counting_step():
        s = worker.engine.scheduler
        seen.append(len(s.running) + len(s.waiting))
        return step()

    worker.engine.step = counting_step
    return seen


def concurrently(worker: PrefillWorker, calls: list[tuple[str, list[int]]]) -> dict:
    """All ``calls`` at once, each on its own thread (as the actor's threads call it): rid -> handoff or error."""
    results, gate = {}, threading.Barrier(len(calls))

    def one(rid, prompt):
        gate.wait()
        try:
            results[rid] = worker.prefill(rid, prompt, PARAMS)
        except Exception as e:  # noqa: BLE001 - the test looks at it
            results[rid] = e

    threads = [threading.Thread(target=one, args=c) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a prefill call never returned"
    return results


def stored_kv(worker: PrefillWorker, handoff) -> list[np.ndarray]:
    data = worker.store.get(handoff.keys, handoff.kv_tokens)
    return [a for g in data.groups for a in (g.k, g.v, g.k_scale, g.v_scale)]


def assert_clean(worker: PrefillWorker) -> None:
    assert worker.engine.pool.free_counts() == worker.engine.pool.capacity
    assert not worker.engine.sequences and worker.queued_tokens == 0


def test_concurrent_prefills_batch_and_match_prefills_alone(model):
    calls = [(f"r{i}", [(7 * i + j) % CFG.vocab_size for j in range(20 + 9 * i)]) for i in range(6)]
    batched = new_worker(model)
    sizes = batch_sizes(batched)
    got = concurrently(batched, calls)
    assert max(sizes) > 1, f"the calls never shared a step: {sizes}"
    for rid, prompt in calls:
        alone = new_worker(model)
        want = alone.prefill(rid, prompt, PARAMS)
        h = got[rid]
        assert (h.first_token, h.keys, h.kv_tokens, h.finish_reason) == (want.first_token, want.keys, want.kv_tokens,
                                                                         want.finish_reason)
        assert h.lease_id is not None and len(batched.store.leases.live) > 0
        for a, b in zip(stored_kv(batched, h), stored_kv(alone, want)):
            assert np.array_equal(a, b)
    assert batched.load()["served"] == len(calls)
    assert_clean(batched)


def test_a_bad_request_fails_alone_and_a_failing_step_fails_its_batch(model):
    worker = new_worker(model)
    good = [(f"g{i}", list(range(5 + i, 40))) for i in range(3)]
    got = concurrently(worker, good + [("bad", [CFG.vocab_size + 5, 1, 2])])
    assert isinstance(got["bad"], ValueError) and "prompt token ids" in str(got["bad"])
    assert all(got[rid].first_token is not None for rid, _ in good)

    step, failed = worker.engine.step, []

    def failing_step():
        if not failed:
            failed.append(True)
            raise RuntimeError("injected step failure")
        return step()

    worker.engine.step = failing_step
    got = concurrently(worker, [(f"f{i}", list(range(3 + i, 30))) for i in range(3)])
    errors = [r for r in got.values() if isinstance(r, RuntimeError)]
    assert errors and all("injected" in str(e) for e in errors)
    assert_clean(worker)
    after = worker.prefill("after", list(range(11, 40)), PARAMS)  # the worker goes on
    assert after.first_token == new_worker(model).prefill("after", list(range(11, 40)), PARAMS).first_token
    assert_clean(worker)


def test_prefixes_that_do_not_fit_together_wait_for_room(model):
    """Each call imports its stored prefix when admitted; a pool with room for one at a time makes the others wait
    for the blocks the first frees, instead of failing them (one at a time, each would have fitted)."""
    store = KVStore(BlockSpec.of(CFG), fingerprint_of(model), KVLayout.of(CFG))
    tiny = EngineConfig(num_blocks=10, max_seqs=8, max_batched_tokens=512)
    worker = PrefillWorker("p", model, store, fingerprint_of(model), tiny)
    shared = [(5 * j + 3) % CFG.vocab_size for j in range(96)]  # six blocks of the global group
    worker.prefill("first", shared, PARAMS)
    calls = [(f"s{i}", shared + [100 + i]) for i in range(3)]
    got = concurrently(worker, calls)
    for rid, prompt in calls:
        h = got[rid]
        assert not isinstance(h, Exception), f"{rid}: {h!r}"
        assert h.cached_tokens == len(shared)
        assert h.first_token == new_worker(model).prefill(rid, prompt, PARAMS).first_token
    assert_clean(worker)
