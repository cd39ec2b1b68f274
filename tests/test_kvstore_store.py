"""The node store: tiers, capacities, LRU, demotion/promotion, corruption, leases, bad input."""
import numpy as np
import pytest

from kvstore.blocks import BlockSpec
from kvstore.index import KVLayout
from kvstore.store import KVStore, StoreConfig
from model.engine import Engine, EngineConfig, SamplingParams
from model.engine.block_pool import GroupBlocks, KVExport
from model.loader import build, random_state
from model.presets import get_preset

SPEC = BlockSpec(block_size=4, n_kv_heads=1, head_dim=8, n_groups=2)
FP = 0xF00D


def export(n_tokens, seed=0, spec=SPEC):
    """Random int8 KV for a prefix of n_tokens, both groups holding every block."""
    rng = np.random.default_rng(seed)
    nb = -(-n_tokens // spec.block_size)
    groups = [GroupBlocks(0, rng.integers(-127, 128, (nb, *spec.kv_shape), dtype=np.int8),
                          rng.integers(-127, 128, (nb, *spec.kv_shape), dtype=np.int8),
                          rng.random((nb, *spec.scale_shape), dtype=np.float32),
                          rng.random((nb, *spec.scale_shape), dtype=np.float32)) for _ in range(spec.n_groups)]
    return KVExport(spec.block_size, 0, n_tokens, groups)


def same(a: KVExport, b: KVExport):
    assert (a.block_size, a.start, a.end) == (b.block_size, b.start, b.end)
    for x, y in zip(a.groups, b.groups):
        assert x.first_block == y.first_block
        for u, v in zip((x.k, x.v, x.k_scale, x.v_scale), (y.k, y.v, y.k_scale, y.v_scale)):
            np.testing.assert_array_equal(u, v)


def store(tmp_path=None, host=64, disk=0, **kw):
    cfg = StoreConfig(host_capacity_blocks=host, disk_capacity_blocks=disk,
                      disk_dir=str(tmp_path) if disk else None, **kw)
    return KVStore(SPEC, FP, KVLayout(global_mask=3), cfg)


def test_put_match_get_round_trip_and_events():
    s = store()
    toks = list(range(10))
    data = export(10)
    keys = s.put(toks, data, FP)
    assert len(keys) == 3  # two whole blocks and a partial one
    m = s.match(toks + [99, 98])
    assert m.tokens == 10 and m.tiers == ["host"] * 3
    same(s.get(m.keys, 10), data)
    assert [e.kind for e in s.drain_events()] == ["stored"] * 3
    assert s.snapshot()["hit_tokens"]["host"] == 10 and s.snapshot()["miss_tokens"] == 2
    assert [x.tokens for x in s.match_many([toks, [7] * 5, toks[:6]])] == [10, 0, 6]
    before = s.snapshot()
    assert s.match(toks, count=False).tokens == 10  # a writer re-matching its own put: not a hit
    assert s.snapshot()["hit_tokens"] == before["hit_tokens"] and s.snapshot()["miss_tokens"] == before["miss_tokens"]


def test_host_capacity_and_lru_order():
    s = store(host=4)
    a, b, c = [1] * 8, [2] * 8, [3] * 8
    s.put(a, export(8, 1), FP)
    s.put(b, export(8, 2), FP)
    s.match(a)  # a is now more recent than b
    s.put(c, export(8, 3), FP)
    assert len(s.index) <= 4 and s.snapshot()["blocks"]["host"] <= 4
    assert s.match(a).tokens == 8 and s.match(c).tokens == 8 and s.match(b).tokens == 0
    assert s.snapshot()["evictions"] == 2


def test_demotion_to_disk_and_promotion_keep_bytes_identical(tmp_path):
    s = store(tmp_path, host=2, disk=8)
    datas = {i: export(8, i) for i in range(3)}
    for i, d in datas.items():
        s.put([i] * 8, d, FP)
    snap = s.snapshot()
    assert snap["blocks"] == {"host": 2, "disk": 4} and snap["demotions"] == 4
    for i, d in datas.items():
        m = s.match([i] * 8)
        assert m.tokens == 8
        same(s.get(m.keys, 8), d)  # disk blocks come back bit-identical, promoted to host
    assert s.snapshot()["promotions"] >= 4


def test_a_corrupted_disk_block_is_a_miss_never_data(tmp_path):
    s = store(tmp_path, host=1, disk=8)
    s.put([7] * 8, export(8, 7), FP)
    s.put([8] * 4, export(4, 8), FP)  # pushes [7]*8's blocks to disk
    m = s.match([7] * 8)
    assert "disk" in m.tiers
    disk_key = m.keys[m.tiers.index("disk")]
    path = s.disk.path(disk_key)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert s.get(m.keys, 8) is None
    assert s.snapshot()["corrupt_blocks"] == 1
    assert s.match([7] * 8).tokens < 8  # the damaged block (and what extends it) left the index


def test_leased_blocks_survive_pressure_and_expired_leases_are_reclaimed():
    now = [0.0]
    s = store(host=2)
    s.leases._clock = lambda: now[0]
    s.put([1] * 8, export(8, 1), FP)
    lease = s.lease(s.match([1] * 8).keys, ttl_s=5)
    s.put([2] * 8, export(8, 2), FP)  # no room: the leased blocks must stay
    assert s.match([1] * 8).tokens == 8
    assert s.snapshot()["live_leases"] == 1
    now[0] = 10.0
    s.put([3] * 8, export(8, 3), FP)  # the lease has expired: reclaimed, blocks evictable again
    assert s.snapshot()["live_leases"] == 0 and s.snapshot()["expired_leases"] == 1
    assert s.match([3] * 8).tokens == 8
    assert s.release(lease) is False  # releasing again is harmless


def test_double_release_is_harmless():
    s = store()
    s.put([1] * 8, export(8), FP)
    lid = s.lease(s.match([1] * 8).keys)
    assert s.release(lid) is True and s.release(lid) is False
    assert all(e.pins == 0 for e in s.index.entries.values())


def test_leases_of_a_lost_owner_are_released_by_owner_only():
    s = store()
    s.put([1] * 8, export(8), FP)
    keys = s.match([1] * 8).keys
    mine, other = s.lease(keys, owner="prefill-0/req-1"), s.lease(keys, owner="prefill-0/req-2")
    assert s.release_owned("prefill-0/req-1") == 1 and s.release_owned("prefill-0/req-1") == 0
    assert s.release(mine) is False and s.release(other) is True  # the other request's lease was left alone
    assert all(e.pins == 0 for e in s.index.entries.values())
    with pytest.raises(ValueError, match="owner"):
        s.release_owned("")


@pytest.mark.parametrize("mutate, message", [
    (lambda d: setattr(d, "block_size", 8), "block size 8"),
    (lambda d: setattr(d.groups[0], "k", d.groups[0].k.astype(np.int16)), "expected int8"),
    (lambda d: setattr(d.groups[1], "v", d.groups[1].v[:, :2]), r"expected int8 \(4, 1, 8\)"),
    (lambda d: setattr(d.groups[0], "k_scale", None), "not int8"),
    (lambda d: d.groups.pop(), "1 KV groups"),
])
def test_bad_puts_are_refused_and_change_nothing(mutate, message):
    s = store()
    s.put([5] * 8, export(8, 5), FP)
    before = (set(s.index.entries), s.snapshot()["blocks"], len(s.drain_events()))
    bad = export(8, 6)
    mutate(bad)
    with pytest.raises(ValueError, match=message):
        s.put([6] * 8, bad, FP)
    assert (set(s.index.entries), s.snapshot()["blocks"], len(s.drain_events())) == (before[0], before[1], 0)


def test_fingerprint_mismatch_and_unknown_keys_are_refused():
    s = store()
    with pytest.raises(ValueError, match="fingerprint"):
        s.put([1] * 4, export(4), FP + 1)
    with pytest.raises(KeyError, match="unknown block keys"):
        s.lease([12345])


def test_engine_kv_through_the_store_into_another_engine():
    """Real KV: engine A exports a conversation, the store keeps it, engine B reuses it."""
    cfg = get_preset("skv-tiny")
    model = build(cfg, random_state(cfg, 0))
    spec = BlockSpec.of(cfg)
    s = KVStore(spec, FP, KVLayout.of(cfg), StoreConfig(host_capacity_blocks=256))
    a = Engine(model, EngineConfig())
    a.eos_ids = set()
    history = list(range(3, 60))
    rid = a.add_request(history, SamplingParams(max_tokens=1), hold_kv=True)
    list(a.stream())
    s.put(history, a.export_kv(rid), FP)
    a.release(rid)

    follow = history + [70, 71, 72]
    m = s.match(follow)
    assert m.tokens == len(history)
    b = Engine(model, EngineConfig())
    b.eos_ids = set()
    prefix = b.import_kv(s.get(m.keys, m.tokens))
    b.add_request(follow, SamplingParams(max_tokens=8), prefix=prefix)
    b.release_prefix(prefix)
    outs = list(b.stream())
    assert outs[-1].cached_tokens == len(history)
    alone = Engine(model, EngineConfig())  # the same prompt computed from scratch, by itself
    alone.eos_ids = set()
    expected = alone.generate([follow], SamplingParams(max_tokens=8))[0]
    got = [t for o in outs for t in o.token_ids]
    from greedy import assert_same_greedy

    assert_same_greedy(model, follow, expected, got)


def test_host_overflow_demotes_down_to_the_low_watermark(tmp_path):
    s = store(tmp_path, host=10, disk=40, host_low_watermark=0.5)
    for i in range(3):
        s.put([i] * 16, export(16, i), FP)  # 4 blocks each: the 11th host block triggers demotion
    snap = s.snapshot()
    assert snap["blocks"]["host"] <= 10 and snap["blocks"]["host"] + snap["blocks"]["disk"] == 12
    assert snap["demotions"] >= 5
    for i in range(3):
        assert s.match([i] * 16).tokens == 16


def test_a_running_request_extends_its_stored_prefix_block_by_block():
    """The decode worker publishes only the blocks filled since its last put (an export starting past 0):
    the store then holds what puts of the whole context each time would hold, byte for byte; an extension
    of a prefix the store does not hold (evicted, or a restarted store) stores nothing."""
    cfg = get_preset("skv-tiny")
    model = build(cfg, random_state(cfg, 0))
    spec = BlockSpec.of(cfg)
    e = Engine(model, EngineConfig())
    e.eos_ids = set()
    tokens = list(range(3, 73))
    rid = e.add_request(tokens, SamplingParams(max_tokens=1), hold_kv=True)
    list(e.stream())  # 70 tokens computed: 4 whole blocks of 16
    steps, whole = KVStore(spec, FP, KVLayout.of(cfg)), KVStore(spec, FP, KVLayout.of(cfg))
    for start, end in ((0, 32), (32, 48), (48, 64)):
        steps.put(tokens, e.export_kv(rid, start, end), FP)
        whole.put(tokens, e.export_kv(rid, 0, end), FP)
    assert steps.snapshot()["bytes_in"] < whole.snapshot()["bytes_in"]  # each byte sent once
    assert set(steps.index.entries) == set(whole.index.entries)
    m = steps.match(tokens)
    assert m.tokens == 64 and m.keys == whole.match(tokens).keys
    a, b = steps.get(m.keys, 64), whole.get(m.keys, 64)
    for ga, gb in zip(a.groups, b.groups):  # every block the whole puts hold, the same bytes
        for j in range(len(gb.k)):
            i = gb.first_block + j - ga.first_block
            for x, y in ((ga.k, gb.k), (ga.v, gb.v), (ga.k_scale, gb.k_scale), (ga.v_scale, gb.v_scale)):
                np.testing.assert_array_equal(x[i], y[j])

    fresh = KVStore(spec, FP, KVLayout.of(cfg))  # holds nothing of the prefix
    assert fresh.put(tokens, e.export_kv(rid, 32, 48), FP) is None and not fresh.index.entries
    unaligned = e.export_kv(rid, 32, 48)
    unaligned.start = 40
    with pytest.raises(ValueError, match="must start on a block boundary, not at position 40"):
        steps.put(tokens, unaligned, FP)
