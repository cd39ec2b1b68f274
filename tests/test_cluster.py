"""Prefill -> store -> decode on a local Ray cluster (127.0.0.1) against the single-process model.

The clusters here run the default precision (int8 weights, activations and KV). Its numerics are
batch-invariant (int8 GEMMs accumulate exactly; the input rotation and attention sum in a fixed
order per row), so the cluster must reproduce the model token for token whatever the batch
composition, chunking or worker (tests/greedy.py allows no near-tie escape for it).
"""
import time

import pytest

from kvstore.handoff import WorkerInfo, handshake
from model.config import QuantConfig
from model.engine import Engine, EngineConfig, SamplingParams
from model.loader import load

from greedy import assert_same_greedy

pytestmark = pytest.mark.slow


def alone(model, prompt: list[int], params: SamplingParams) -> list[int]:
    """The paged engine running the prompt by itself: what the cluster's engines compute, batched or not.
    (Not ``model.generate``: its contiguous cache attends in another order, which int8 activations
    can turn into a flipped near tie.)"""
    return Engine(model, EngineConfig(kv_cache_bytes=64 * 2**20, max_seqs=1)).generate([prompt], params)[0]


def conversation_turns(first, turns, make_user, cluster, reference_model, params, session):
    """Runs a multi-turn conversation; returns the prefill reports of each turn."""
    history, reports = list(first), []
    for turn in range(turns):
        tokens, last, handoff = cluster.generate(history, params, session_id=session)
        expected = alone(reference_model, history, params)
        assert_same_greedy(reference_model, history, expected, tokens)
        assert last.finished
        reports.append((len(history), handoff.cached_tokens))
        history = history + tokens + make_user(turn)
    return reports


W8A8KV8 = QuantConfig()  # the default: batch-invariant, so clusters give the model's tokens exactly


@pytest.fixture(scope="module")
def tiny_cluster():
    from pdserve.cluster import LocalCluster

    with LocalCluster("skv-tiny", quant=W8A8KV8) as c:
        yield c


def test_skv_tiny_through_the_cluster_matches_the_model(tiny_cluster):
    ref = load("skv-tiny", quant=W8A8KV8).model
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    prompts = [list(range(3 + i, 20 + 7 * i)) for i in range(15)]
    subs = [tiny_cluster.submit(p, params) for p in prompts]  # all in flight together
    for p, sub in zip(prompts, subs):
        tokens = [t for out in tiny_cluster.stream(sub) for t in out.token_ids]
        assert_same_greedy(ref, p, alone(ref, p, params), tokens)
    reports = conversation_turns(list(range(100, 140)), 5, lambda t: [200 + t, 201, 202], tiny_cluster, ref,
                                 params, "conv-1")
    bs = ref.config.block_size
    for (history, hit), (prev_history, _) in zip(reports[1:], reports):
        assert hit >= prev_history + params.max_tokens - 1 - bs  # the previous turn's prompt and answer
    stats = tiny_cluster.store_stats()
    assert stats["live_leases"] == 0


def test_a_short_second_turn_reuses_less_than_a_block(tiny_cluster):
    """A conversation shorter than one block still hits the cache on its next turn (token-granular
    reuse of the partial block), and only other requests' reuse counts as a store hit."""
    ref = load("skv-tiny", quant=W8A8KV8).model
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    first = [300, 301, 302, 303, 304, 305]  # prompt + answer < one block (16)
    tokens, _, handoff = tiny_cluster.generate(first, params, session_id="short")
    assert handoff.cached_tokens == 0
    second = first + tokens + [310, 311]
    hits = sum(tiny_cluster.store_stats()["hit_tokens"].values())
    tokens2, last, handoff2 = tiny_cluster.generate(second, params, session_id="short")
    published = len(first) + len(tokens) - 1  # the decode worker publishes all but the last token's KV
    assert handoff2.cached_tokens == published
    assert sum(tiny_cluster.store_stats()["hit_tokens"].values()) == hits + published
    assert_same_greedy(ref, second, alone(ref, second, params), tokens2)
    status = tiny_cluster.status()
    assert status["delivered_partial_tokens"] >= published and status["delivered_hit_tokens"] % 16 == 0


def test_cancel_mid_decode_and_mid_prefill_frees_everything(tiny_cluster):
    params = SamplingParams(max_tokens=400, ignore_eos=True)
    sub = tiny_cluster.submit(list(range(5, 60)), params)
    stream = tiny_cluster.stream(sub)
    next(stream), next(stream)  # decoding now
    tiny_cluster.cancel(sub.request_id)
    last = list(stream)[-1]
    assert last.finished and last.finish_reason == "abort"

    sub2 = tiny_cluster.submit(list(range(7, 300)), params)
    tiny_cluster.cancel(sub2.request_id)  # most likely still prefilling
    assert [o for o in tiny_cluster.stream(sub2)][-1].finish_reason == "abort"
    deadline = time.time() + 30
    while time.time() < deadline:
        loads = tiny_cluster.loads()
        decode = loads["decode-0"]
        if decode["free_blocks"] == decode["capacity"] and tiny_cluster.store_stats()["live_leases"] == 0:
            break
        time.sleep(0.2)
    assert decode["running"] == 0 and decode["free_blocks"] == decode["capacity"]
    assert tiny_cluster.store_stats()["live_leases"] == 0


def test_handshake_refuses_mismatched_workers():
    base = WorkerInfo("p", "prefill", 64, "int8", 0xABC)
    handshake(base, WorkerInfo("d", "decode", 64, "int8", 0xABC))
    for change, word in ((dict(block_size=16), "block_size 64 != 16"), (dict(kv_dtype="bfloat16"), "kv_dtype"),
                         (dict(fingerprint=0xDEF), "fingerprint 0xabc != 0xdef")):
        other = WorkerInfo("d", "decode", **{**dict(block_size=64, kv_dtype="int8", fingerprint=0xABC), **change})
        with pytest.raises(ValueError, match=f"cannot be paired: {word}"):
            handshake(base, other)


def test_workers_built_from_different_models_do_not_pair():
    from kvstore.blocks import BlockSpec
    from kvstore.index import KVLayout
    from kvstore.keys import fingerprint_of
    from kvstore.store import KVStore
    from model.loader import build, random_state
    from model.presets import get_preset
    from prefill.worker import PrefillWorker
    from decode.worker import DecodeWorker

    cfg = get_preset("skv-tiny")
    a = build(cfg, random_state(cfg, 0))
    b = build(cfg.with_quant(QuantConfig.off()), random_state(cfg, 0))
    store = KVStore(BlockSpec.of(cfg), fingerprint_of(a), KVLayout.of(cfg))
    p = PrefillWorker("p", a, store, fingerprint_of(a))
    d = DecodeWorker("d", b, store, fingerprint_of(b))
    try:
        with pytest.raises(ValueError, match="cannot be paired: kv_dtype int8 != float32"):
            handshake(p.info(), d.info())
    finally:
        p.shutdown()
        d.shutdown()


@pytest.fixture(scope="module")
def smollm2_cluster(smollm2_int8):
    """The driver's own load (tokenizer, config and fingerprint; the workers load theirs) is the session's
    SmolLM2 in int8 (tests/conftest.py): the same call's result, without a second half-minute int8 load."""
    import pdserve.cluster
    from pdserve.cluster import LocalCluster

    real = pdserve.cluster.load

    def load_once(model, quant=None, **kw):
        return smollm2_int8 if (model, quant, kw) == ("smollm2-135m", W8A8KV8, {}) else real(model, quant=quant, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pdserve.cluster, "load", load_once)
        cluster = LocalCluster("smollm2-135m", quant=W8A8KV8)
    with cluster as c:
        yield c


def test_smollm2_through_the_cluster_matches_the_model(smollm2_cluster, smollm2_int8):
    tok, ref = smollm2_int8.tokenizer, smollm2_int8.model
    params = SamplingParams(max_tokens=12, stop_token_ids=(tok.eos_token_id,))
    questions = ["What is the capital of France?", "Name three fruits.", "Write one sentence about rain.",
                 "What is 7 times 8?", "Who wrote Hamlet?", "Give me a synonym for happy.",
                 "How many legs does a spider have?", "What colour is the sky?", "Translate 'thank you' to French.",
                 "Name a planet.", "What is water made of?", "Suggest a name for a cat.",
                 "What is the opposite of cold?", "Finish this: once upon a", "Why do leaves fall?"]
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in questions]
    subs = [smollm2_cluster.submit(p, params) for p in prompts]  # 15 in flight together
    for prompt, sub in zip(prompts, subs):
        tokens = [t for out in smollm2_cluster.stream(sub) for t in out.token_ids]
        assert_same_greedy(ref, prompt, alone(ref, prompt, params), tokens)
    first = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Tell me about the moon."}]))
    user = lambda t: tok.encode(f"<|im_end|>\n<|im_start|>user\nAnd more, part {t}?<|im_end|>\n<|im_start|>assistant\n")
    reports = conversation_turns(first, 5, user, smollm2_cluster, ref, params, "moon")  # 15 + 5 = 20 prompts
    assert all(hit >= prev - 64 for (_, hit), (prev, _) in zip(reports[1:], reports))
