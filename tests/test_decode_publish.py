"""While a request decodes, the decode worker publishes each block it fills (a migrated request resumes
from them), sending only the blocks since its last put: the store must end up holding the running
request's whole context, byte for byte what the engine holds, whether the prompt's KV came from this
node's store (extended) or from another node's (sent whole once, then extended)."""
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
    seq = decode.engine.sequences["r"]
    m = local.match(seq.tokens[:80])
    assert m.tokens == 80  # all five blocks, reachable from the first
    stored, held = local.get(m.keys, 80), decode.engine.export_kv("r", 0, 80)
    for gs, gh in zip(stored.groups, held.groups):  # every block the engine holds, the same bytes
        for j in range(len(gh.k)):
            i = gh.first_block + j - gs.first_block
            for x, y in ((gs.k, gh.k), (gs.v, gh.v), (gs.k_scale, gh.k_scale), (gs.v_scale, gh.v_scale)):
                np.testing.assert_array_equal(x[i], y[j])
