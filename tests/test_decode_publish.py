"""While a request decodes, the decode worker publishes each block it fills (a migrated request resumes
from them), sending only the blocks since its last put: the store must end up holding the running
request's whole context, byte for byte what the engine holds, whether the prompt's KV came from this
node's store (extended) or from another node's (sent whole once, then extended); at its end, only what
the store lacks."""
import numpy as np
import pytest

from decode.worker import DecodeWorker
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
ENGINE = EngineConfig(kv_cache_bytes=16 * 2**20, max_seqs=8)


@pytest.fixture(scope="module")
def model():
    with one_torch_thread():
        yield build(CFG, random_state(CFG, 0))


def new_store(model) -> KVStore:
    return KVStore(BlockSpec.of(CFG), fingerprint_of(model), KVLayout.of(CFG))


@pytest.mark.parametrize("remote", [False, True], ids=["same-node", "prompt-from-another-node"])
def test_a_running_request_is_in_the_store_block_by_block(model, remote):
    fp = fingerprint_of(model)
    prefill_store = new_store(model)
    local = new_store(model) if remote else prefill_store
    prefill = PrefillWorker("p", model, prefill_store, fp, ENGINE)
    decode = DecodeWorker("d", model, local, fp, ENGINE)
    decode.shutdown()  # stepped by hand
    params = SamplingParams(max_tokens=60, ignore_eos=True)
    handoff = prefill.prefill("r", list(range(3, 43)), params)  # 40 tokens: 2 whole blocks stored by prefill
    decode.submit(handoff, params, source=prefill_store if remote else None)
    while decode.engine.sequences["r"].computed < 80:
        decode._step()
    # all five blocks, reachable from the first: every block the engine holds, the same bytes
    assert_holds(local, decode.engine.sequences["r"].tokens[:80], decode.engine.export_kv("r", 0, 80))



def assert_holds(store: KVStore, tokens: list[int], held) -> None:
    """The store matches all of ``tokens`` and holds every block of ``held`` (an export from 0), byte for byte."""
    m = store.match(tokens, count=False)
    assert m.tokens == held.end
    stored = store.get(m.keys, held.end)
    for gs, gh in zip(stored.groups, held.groups):
        for j in range(len(gh.k)):
            i = gh.first_block + j - gs.first_block
            for x, y in ((gs.k, gh.k), (gs.v, gh.v), (gs.k_scale, gh.k_scale), (gs.v_scale, gh.v_scale)):
                np.testing.assert_array_equal(x[i], y[j])


class RecordingStore(KVStore):
    """Records each put's export range and answer."""

    def put(self, tokens, data, fingerprint):
        answer = super().put(tokens, data, fingerprint)
        self.puts.append((data.start, data.end, answer))
        return answer


@pytest.mark.parametrize("lost", [False, True], ids=["store-holds-the-prefix", "store-lost-it"])
def test_the_end_of_a_conversation_sends_only_what_the_store_lacks(model, lost):
    """The put at a request's end sends the blocks since the last one; a store that no longer holds the
    prefix they extend (here: a new, empty store, as after a restart) answers None and gets the whole
    context. Either way the store then holds the whole conversation, the engine's bytes."""
    fp = fingerprint_of(model)
    store = RecordingStore(BlockSpec.of(CFG), fp, KVLayout.of(CFG))
    store.puts = []
    prefill = PrefillWorker("p", model, store, fp, ENGINE)
    decode = DecodeWorker("d", model, store, fp, ENGINE)
    decode.shutdown()  # stepped by hand
    ended, release = {}, decode.engine.release

    def release_seen(rid):  # what the engine held when the request ended
        ended[rid] = (list(decode.engine.sequences[rid].tokens), decode.engine.export_kv(rid))
        release(rid)

    decode.engine.release = release_seen
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    decode.submit(prefill.prefill("r", list(range(3, 43)), params), params)
    while decode.engine.sequences["r"].computed < 64:
        decode._step()
    if lost:
        decode.store = RecordingStore(BlockSpec.of(CFG), fp, KVLayout.of(CFG))
        decode.store.puts = []
    while "r" not in ended:
        decode._step()
    tokens, held = ended["r"]
    assert held.end == 89  # 40 prompt tokens, then 49 of the 50 tokens made have KV
    last = decode.store.puts[-1]
    if lost:  # the blocks since the last put were refused, then the whole conversation went
        assert decode.store.puts[-2] == (80, 89, None) and last[:2] == (0, 89) and last[2]
    else:  # only the last, partial block went
        assert last[:2] == (80, 89) and len(last[2]) == 1 and decode.publish_failures == 0
    assert_holds(decode.store, tokens, held)


def test_a_store_that_lost_the_prefix_gets_the_whole_context_at_the_next_block(model):
    """After a store restart (here: a new, empty store) the running request's next put is refused (None);
    the one after sends its whole context, so that a migration resumes from it, not from nothing."""
    fp = fingerprint_of(model)
    store = new_store(model)
    prefill = PrefillWorker("p", model, store, fp, ENGINE)
    decode = DecodeWorker("d", model, store, fp, ENGINE)
    decode.shutdown()  # stepped by hand
    params = SamplingParams(max_tokens=80, ignore_eos=True)
    decode.submit(prefill.prefill("r", list(range(3, 43)), params), params)
    while decode.engine.sequences["r"].computed < 50:
        decode._step()
    decode.store = RecordingStore(BlockSpec.of(CFG), fp, KVLayout.of(CFG))  # the store restarted, empty
    decode.store.puts = []
    while decode.engine.sequences["r"].computed < 96:
        decode._step()
    assert [p[:2] for p in decode.store.puts] == [(48, 64), (0, 80), (80, 96)] and decode.store.puts[0][2] is None
    seq = decode.engine.sequences["r"]
    assert_holds(decode.store, seq.tokens[:96], decode.engine.export_kv("r", 0, 96))
