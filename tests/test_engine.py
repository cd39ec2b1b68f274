"""The paged, batched engine against one request at a time: the contiguous-cache model, or (default int8,
where tokens must match exactly) the paged engine running the prompt alone and whole."""
import numpy as np
import pytest
import torch

from model.config import QuantConfig
from model.engine import Engine, EngineConfig, SamplingParams
from model.generate import generate
from model.loader import build, random_state
from model.presets import get_preset
from model.quality import full_logits

from greedy import assert_same_greedy, is_batch_invariant

QUANTS = {"float32": QuantConfig.off(), "w8-kv8": QuantConfig(activations=False), "w8-a8-kv8": QuantConfig()}


@pytest.fixture(scope="module", params=list(QUANTS))
def tiny(request):
    cfg = get_preset("skv-tiny").with_quant(QUANTS[request.param])
    return build(cfg, random_state(cfg, 0))


def prompts(n=16, seed=0, lo=1, hi=90):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=g)
    return [torch.randint(3, 512, (int(k),), generator=g).tolist() for k in lengths]


def reference(model, prompt, max_tokens):
    """Greedy tokens of the prompt alone: the paged engine with one request and its prompt in one chunk
    for the default int8 (the same kernels, so equality is exact), the contiguous-cache model otherwise."""
    if is_batch_invariant(model):
        return engine(model, max_batched_tokens=len(prompt) + 1).generate([prompt], SamplingParams(max_tokens=max_tokens))[0]
    return list(generate(model, prompt, SamplingParams(max_tokens=max_tokens)))


def engine(model, **kw):
    e = Engine(model, EngineConfig(**kw))
    e.eos_ids = set()  # random weights: don't let token 2 end sequences early
    return e


def test_batched_chunked_engine_matches_contiguous(tiny):
    ps = prompts()
    assert max(map(len, ps)) > 3 * 24  # longer than the local window
    expected = [reference(tiny, p, 40) for p in ps]
    e = engine(tiny, max_batched_tokens=37)  # chunked prefill mixed with decode steps
    got = e.generate(ps, SamplingParams(max_tokens=40))
    for p, a, b in zip(ps, expected, got):
        assert len(b) == 40
        assert_same_greedy(tiny, p, a, b)
    if is_batch_invariant(tiny) or not tiny.config.quant.activations:
        assert got == expected
    assert e.pool.free_counts() == e.pool.capacity


def test_prefix_reuse_in_place_with_a_partial_tail_block(tiny):
    e = engine(tiny, max_batched_tokens=64)
    history = prompts(1, seed=3, lo=53, hi=54)[0]  # 53 tokens: the last block (16) is partial
    first = e.add_request(history, SamplingParams(max_tokens=1), hold_kv=True)
    list(e.stream())
    before = e.export_kv(first)
    prefix = e.share_prefix(first, 53)
    follow = history + [7, 8, 9, 10, 11]
    rid = e.add_request(follow, SamplingParams(max_tokens=12), prefix=prefix)
    e.release_prefix(prefix)
    outs = list(e.stream())
    got = [t for o in outs for t in o.token_ids]
    assert outs[-1].cached_tokens == 53
    assert_same_greedy(tiny, follow, reference(tiny, follow, 12), got)
    after = e.export_kv(first)  # copy-on-write left the shared tail block untouched
    for a, b in zip(before.groups, after.groups):
        np.testing.assert_array_equal(a.k, b.k)
        np.testing.assert_array_equal(a.v, b.v)
    e.release(first)
    assert e.pool.free_counts() == e.pool.capacity
    assert rid not in e.sequences


def test_export_import_round_trip_into_another_engine(tiny):
    src = engine(tiny, max_batched_tokens=40)
    conv = prompts(1, seed=5, lo=70, hi=71)[0]
    rid = src.add_request(conv, SamplingParams(max_tokens=9), hold_kv=True)
    turn1 = [t for o in src.stream() for t in o.token_ids]
    exported = src.export_kv(rid)  # prompt + 8 generated tokens computed (the 9th is not yet)
    assert exported.end == len(conv) + 8
    local = [g for g, spec in zip(exported.groups, tiny.config.kv_groups) if spec.window is not None]
    assert all(g.first_block > 0 for g in local)  # window-aware: early local blocks are not shipped
    src.release(rid)
    assert src.pool.free_counts() == src.pool.capacity

    dst = engine(tiny, max_batched_tokens=40)
    prefix = dst.import_kv(exported)
    turn2 = conv + turn1 + [40, 41, 42]
    rid2 = dst.add_request(turn2, SamplingParams(max_tokens=10), prefix=prefix)
    dst.release_prefix(prefix)
    outs = list(dst.stream())
    assert outs[-1].cached_tokens == exported.end
    assert_same_greedy(tiny, turn2, reference(tiny, turn2, 10), [t for o in outs for t in o.token_ids])
    assert dst.pool.free_counts() == dst.pool.capacity and rid2 not in dst.sequences


def test_preemption_under_a_tiny_pool_completes_everything(tiny):
    ps = prompts(8, seed=7, lo=10, hi=60)
    free = engine(tiny, max_batched_tokens=64)
    expected = free.generate(ps, SamplingParams(max_tokens=30))
    small = engine(tiny, num_blocks=9, max_batched_tokens=64)
    got = small.generate(ps, SamplingParams(max_tokens=30))
    assert small.scheduler.preemptions > 0
    for p, a, b in zip(ps, expected, got):
        assert len(b) == 30
        assert_same_greedy(tiny, p, a, b)
    assert small.pool.free_counts() == small.pool.capacity


def test_a_waiting_sequence_holding_imported_kv_never_stalls_the_queue(tiny):
    """A runs; B's imported KV takes every free block while B waits; A's next token preempts A, whose
    recompute cannot fit while B holds those blocks, and nothing runs. B must go first (or give its
    blocks up): the engine must not step forever with nothing to do."""
    b_prompt, a_prompt = prompts(1, seed=9, lo=222, hi=223)[0], prompts(1, seed=10, lo=160, hi=161)[0]
    src = engine(tiny, max_batched_tokens=512)
    rid = src.add_request(b_prompt, SamplingParams(max_tokens=1), hold_kv=True)
    b_prompt = b_prompt + [t for o in src.stream() for t in o.token_ids]
    data = src.export_kv(rid)  # 222 tokens: 14 blocks of 16 in the global group
    e = engine(tiny, num_blocks=24, max_batched_tokens=512)
    params = SamplingParams(max_tokens=8)
    e.add_request(a_prompt, params, request_id="a")
    got = {"a": [t for o in e.step() for t in o.token_ids]}  # A's prompt: 10 blocks, the next token needs an 11th
    prefix = e.import_kv(data)
    assert min(e.pool.free_counts()) == 0
    e.add_request(b_prompt, params, request_id="b", prefix=prefix)
    e.release_prefix(prefix)
    got["b"] = []
    for _ in range(50):
        for o in e.step():
            got[o.request_id] += o.token_ids
        if not e.has_work():
            break
    assert not e.has_work() and e.scheduler.preemptions >= 1
    for rid, prompt in (("a", a_prompt), ("b", b_prompt)):
        assert len(got[rid]) == 8
        assert_same_greedy(tiny, prompt, reference(tiny, prompt, 8), got[rid])
    assert e.pool.free_counts() == e.pool.capacity


def test_waiting_sequences_that_block_each_other_give_up_imported_kv(tiny):
    """B and C each hold 10 imported blocks of 24 and each needs 5 more for the rest of its prompt: 4
    are free and nothing runs. One of them must give its blocks up (and be recomputed)."""
    src = engine(tiny, max_batched_tokens=512)
    params, imported = SamplingParams(max_tokens=4), {}
    for rid, seed in (("b", 11), ("c", 12)):
        prompt = prompts(1, seed=seed, lo=230, hi=231)[0]
        src.add_request(prompt[:160], SamplingParams(max_tokens=1), request_id=rid, hold_kv=True)
        list(src.stream())
        imported[rid] = (prompt, src.export_kv(rid))  # 160 tokens: 10 blocks of the global group
        src.release(rid)
    e = engine(tiny, num_blocks=24, max_batched_tokens=512)
    for rid, (prompt, data) in imported.items():
        prefix = e.import_kv(data)
        e.add_request(prompt, params, request_id=rid, prefix=prefix)
        e.release_prefix(prefix)
    got = {rid: [] for rid in imported}
    for _ in range(50):
        for o in e.step():
            got[o.request_id] += o.token_ids
        if not e.has_work():
            break
    assert not e.has_work() and e.scheduler.preemptions == 1
    for rid, (prompt, _) in imported.items():
        assert_same_greedy(tiny, prompt, reference(tiny, prompt, 4), got[rid])
    assert e.pool.free_counts() == e.pool.capacity


def test_request_that_can_never_fit_is_refused(tiny):
    e = engine(tiny, num_blocks=4)
    with pytest.raises(ValueError, match="can never fit the KV pool"):
        e.add_request(list(range(3, 100)), SamplingParams(max_tokens=10))


def test_abort_mid_prefill_and_mid_decode_returns_every_block(tiny):
    e = engine(tiny, max_batched_tokens=16)
    initial = e.pool.free_counts()
    long_ids = [e.add_request(p, SamplingParams(max_tokens=50)) for p in prompts(4, seed=9, lo=60, hi=80)]
    e.step()
    assert e.scheduler.running[0].pending > 0  # mid-prefill
    assert e.pool.free_counts() != initial
    aborted = e.abort(long_ids[0])
    assert aborted.finished and aborted.finish_reason == "abort"
    for _ in range(20):
        e.step()
    decoding = [s for s in e.scheduler.running if s.output]
    assert decoding  # mid-decode
    for rid in long_ids[1:]:
        e.abort(rid)
    assert not e.has_work()
    assert e.pool.free_counts() == initial
    assert e.abort("nope") is None


def test_seeded_sampling_is_reproducible_whatever_the_batch(tiny):
    sp = SamplingParams(max_tokens=20, temperature=0.9, top_k=50, top_p=0.9, seed=123)
    p = prompts(1, seed=11)[0]
    alone = engine(tiny).generate([p], sp)[0]
    e = engine(tiny, max_batched_tokens=30)
    others = prompts(5, seed=12)
    mixed = e.generate(others[:2] + [p] + others[2:], [SamplingParams(max_tokens=20, temperature=1.0)] * 2 + [sp]
                       + [SamplingParams(max_tokens=20, temperature=1.0)] * 3)[2]
    if is_batch_invariant(tiny) or not tiny.config.quant.activations:
        assert mixed == alone
    other_seed = engine(tiny).generate([p], SamplingParams(max_tokens=20, temperature=0.9, top_k=50, top_p=0.9, seed=7))[0]
    assert alone != other_seed
    assert engine(tiny).generate([p], sp)[0] == alone


def test_logprobs_are_those_of_the_chosen_tokens(tiny):
    e = engine(tiny)
    p = prompts(1, seed=13)[0]
    e.add_request(p, SamplingParams(max_tokens=5, logprobs=True))
    outs = list(e.stream())
    tokens = [t for o in outs for t in o.token_ids]
    logprobs = [lp for o in outs for lp in o.logprobs]
    logits = full_logits(tiny, p + tokens)
    expected = [float(torch.log_softmax(logits[len(p) - 1 + i], -1)[t]) for i, t in enumerate(tokens)]
    np.testing.assert_allclose(logprobs, expected, atol=0.05)


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-2), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(seed=-1), "seed"), (dict(stop=("",)), "stop"), (dict(temperature=float("nan")), "temperature"),
])
def test_invalid_sampling_parameters_are_refused(kwargs, field):
    with pytest.raises(ValueError, match=f"invalid sampling parameter {field}="):
        SamplingParams(**kwargs)


def test_bad_requests_are_refused(tiny):
    e = engine(tiny)
    with pytest.raises(ValueError, match="prompt is empty"):
        e.add_request([])
    with pytest.raises(ValueError, match="token ids must lie in"):
        e.add_request([1, 100000])
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        e.add_request([1, 2], SamplingParams(stop=("x",)))
    e.add_request([5], request_id="a")
    with pytest.raises(ValueError, match="already in use"):
        e.add_request([5], request_id="a")


def test_import_of_mismatched_blocks_is_refused(tiny):
    e = engine(tiny)
    rid = e.add_request(list(range(3, 40)), SamplingParams(max_tokens=1), hold_kv=True)
    list(e.stream())
    data = e.export_kv(rid)
    data.block_size = 32
    with pytest.raises(ValueError, match="block size"):
        e.import_kv(data)
    data = e.export_kv(rid)
    with pytest.raises(ValueError, match="block boundary"):
        e.export_kv(rid, start=5)
    before = e.pool.free_counts()
    data.groups[-1].k = data.groups[-1].k[:, :, :, :8]
    with pytest.raises(ValueError, match="shape"):
        e.import_kv(data)
    assert e.pool.free_counts() == before


def _step_and_check_windows(e, rids) -> int:
    """One step; then each sequence that decoded a token in it holds exactly its local groups' windows: every
    entry below the window is -1, every one from it on is held. The number of tables checked."""
    before = {rid: e.sequences[rid].computed for rid in rids if rid in e.sequences}
    e.step()
    cfg, bs, checked = e.mcfg, e.pool.block_size, 0
    for rid in rids:
        seq = e.sequences.get(rid)
        if seq is None or seq.computed != before.get(rid, -1) + 1:  # not a decode step (a prefill, or preempted)
            continue
        for g in cfg.kv_groups:
            table = seq.tables[g.index]
            if g.window is not None and seq.computed > g.window:
                first_needed = (seq.computed - g.window) // bs  # as the step's reserve left it
                assert all(b < 0 for b in table[:first_needed]), (g.index, seq.computed, table)
                assert all(b >= 0 for b in table[first_needed + 1:]), (g.index, seq.computed, table)
                checked += 1
    return checked


def test_local_groups_hold_only_the_window_while_decoding():
    """Blocks a local group's window has left are freed as decoding slides past them, and only those: each
    step every entry below the window is -1 and every one from it on is held; at the end nothing leaks."""
    cfg = get_preset("skv-tiny")
    e = engine(build(cfg, random_state(cfg, 0)), max_batched_tokens=256)  # whole prompts: several blocks leave at once
    rids = [e.add_request(p, SamplingParams(max_tokens=70)) for p in prompts(n=3, seed=4, lo=80, hi=120)]
    checked = 0
    while e.has_work():
        checked += _step_and_check_windows(e, rids)
        held = [len({b for rid in rids if rid in e.sequences for b in e.sequences[rid].tables[g.index] if b >= 0})
                for g in cfg.kv_groups]
        assert all(c - f >= h for c, f, h in zip(e.pool.capacity, e.pool.free_counts(), held))
    assert checked > 50 and e.pool.free_counts() == e.pool.capacity


def test_a_preempted_sequence_drops_its_window_again():
    """Preemption frees every block and the sequence is recomputed from position 0 (whole blocks again, in a
    prefill): the windows it had already slid past must be dropped again, not remembered as done."""
    cfg = get_preset("skv-tiny")
    model = build(cfg, random_state(cfg, 0))
    e = engine(model, max_batched_tokens=256)
    rids = [e.add_request(p, SamplingParams(max_tokens=60)) for p in prompts(n=2, seed=5, lo=60, hi=80)]
    for _ in range(30):
        e.step()
    victim = e.sequences[rids[0]]
    assert victim.computed > 80 and len(victim.output) >= 20
    e.scheduler.preempt(victim)
    checked = 0
    while e.has_work():
        checked += _step_and_check_windows(e, rids)
    assert checked > 40 and e.pool.free_counts() == e.pool.capacity
    assert e.scheduler.preemptions == 1


def test_the_reserve_host_benchmark_runs_both_schedulers(capsys):
    import subprocess

    from benchmarks import reserve_host

    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=reserve_host.ROOT, capture_output=True).returncode:
        pytest.skip("not a git checkout: no revision to compare against")
    reserve_host.main(["--base", "HEAD", "--batch", "2", "--context", "1100", "--rounds", "2"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("reservations per decode step: HEAD ") and "this tree" in line, line


def test_the_step_host_benchmark_runs_both_trees(capsys):
    import subprocess

    from benchmarks import step_host

    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=step_host.ROOT, capture_output=True).returncode:
        pytest.skip("not a git checkout: no revision to compare against")
    step_host.main(["--base", "HEAD", "--batch", "2", "--context", "1100", "--rounds", "1"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("HEAD ") and "this tree" in line and line.endswith("x"), line


def test_an_export_does_not_carry_what_the_pool_held_before(tiny):
    """A partial last block's slots past the request's tokens are zeros, not the bytes an earlier request left
    in that block: the export is the same from a fresh pool and from a used one."""
    history = prompts(1, seed=9, lo=37, hi=38)[0]  # 37 tokens: 5 slots of the third block of 16 are used

    def exported(e):
        rid = e.add_request(history, SamplingParams(max_tokens=1), hold_kv=True)
        list(e.stream())
        return e.export_kv(rid)

    fresh = exported(engine(tiny, num_blocks=9))
    used = engine(tiny, num_blocks=9)
    used.generate(prompts(1, seed=10, lo=130, hi=131), SamplingParams(max_tokens=4))  # writes every block, frees them
    again = exported(used)
    for a, b in zip(fresh.groups, again.groups):
        for x, y in ((a.k, b.k), (a.v, b.v), (a.k_scale, b.k_scale), (a.v_scale, b.v_scale)):
            if x is not None:
                np.testing.assert_array_equal(x, y)
                assert not x[-1, 37 % 16:].any()
