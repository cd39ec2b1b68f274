"""The prefix index against a brute-force longest-common-prefix oracle (hypothesis)."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.index import KVLayout, PrefixIndex
from kvstore.keys import block_keys, chain_key, trace_block_keys

BS = 4
tokens = st.lists(st.integers(0, 2), min_size=0, max_size=14)  # tiny alphabet: prefixes collide often
ops = st.lists(st.one_of(
    st.tuples(st.just("insert"), tokens),
    st.tuples(st.just("match"), tokens),
    st.tuples(st.just("evict"), st.integers(1, 3)),
    st.tuples(st.just("pin"), tokens),
), max_size=40)


def lcp(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Oracle:
    """Every cached block as the full token prefix it ends: no keys, no trees."""

    def __init__(self):
        self.present: dict[int, tuple] = {}  # key -> prefix tokens through this block

    def insert(self, seq, added):
        for i, key in enumerate(block_keys(0, seq, BS, partial=True)):
            if key in added:
                self.present[key] = tuple(seq[: min(len(seq), (i + 1) * BS)])

    def best(self, query):
        return max([lcp(p, query) for p in self.present.values()] + [0])


@settings(max_examples=300, deadline=None)
@given(ops=ops, capacity=st.one_of(st.none(), st.integers(1, 8)), policy=st.sampled_from(["lru", "slru", "lfu"]))
def test_index_matches_brute_force_longest_common_prefix(ops, capacity, policy):
    oracle = Oracle()
    index = PrefixIndex(BS, capacity_blocks=capacity, policy=policy, on_remove=lambda k: oracle.present.pop(k))
    pinned = set()
    for op, arg in ops:
        if op == "insert":
            oracle.insert(arg, set(index.insert(arg)))
        elif op == "match":
            m = index.match(arg)
            assert m.tokens == oracle.best(arg)
            assert len(m.keys) == -(-m.tokens // BS)
        elif op == "evict":
            before = dict(oracle.present)
            for key in index.evict(arg):
                assert key not in pinned
                mine = before[key]  # only a whole block can be extended by the blocks after it
                assert len(mine) % BS or not any(p[: len(mine)] == mine and len(p) > len(mine)
                                                 for p in oracle.present.values()), "evicted an extended block"
        else:
            m = index.match(arg, touch=False)
            for k in m.keys:
                index.pin(k)
                pinned.add(k)
        # prefix-closed: every cached block's parent is cached
        assert all(e.parent is None or e.parent in index.entries for e in index.entries.values())
        assert set(index.entries) == set(oracle.present)
        if capacity is not None:
            assert len(index) <= max(capacity, len(pinned) + 1)


def test_lru_evicts_the_least_recently_used_leaf_first():
    index = PrefixIndex(BS)
    a, b, c = [1] * 8, [2] * 8, [3] * 8
    for seq in (a, b, c):
        index.insert(seq)
    index.match(a)  # a is now the most recent
    evicted = index.evict(2)
    assert evicted == [block_keys(0, b, BS)[1], block_keys(0, b, BS)[0]]  # b's leaf, then b's root
    assert index.match(a).tokens == 8 and index.match(c).tokens == 8


def test_partial_tail_is_matched_by_tokens():
    index = PrefixIndex(BS)
    index.insert([5, 6, 7, 8, 9, 10, 11, 12])
    m = index.match([5, 6, 7, 8, 9, 10, 99, 99])
    assert m.tokens == 6 and len(m.keys) == 2


def test_local_groups_need_only_the_window():
    # group bit 1 global, bit 2 local with an 8-token window
    layout = KVLayout(global_mask=1, local=((2, 8),))
    index = PrefixIndex(BS, layout=layout)
    seq = list(range(20))
    # early blocks hold only the global group (their local KV left the window), the last two both
    index.insert(seq, groups=[1, 1, 1, 3, 3])
    assert index.match(seq).tokens == 20
    assert index.match(seq[:12]).tokens == 0  # at 12 the window needs blocks 1-2's local KV: absent
    index.insert(seq[:8], groups=3)  # now blocks 0 and 1 hold the local group too
    assert index.match(seq[:12]).tokens == 8
    index2 = PrefixIndex(BS, layout=layout)
    index2.insert(seq, groups=[3, 3, 3, 1, 3])  # a hole inside the window at the end
    assert index2.match(seq).tokens == 12


def test_keys_are_chained_and_fingerprinted():
    a = block_keys(1, list(range(8)), 4)
    assert a[1] == chain_key(a[0], [4, 5, 6, 7])
    assert block_keys(2, list(range(8)), 4) != a  # another model never shares a key
    assert block_keys(1, list(range(9)), 4) == a  # the partial tail is not a full block
    assert trace_block_keys([0, 1]) != trace_block_keys([0, 2])[:1] + [0]


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="unknown eviction policy 'mru'"):
        PrefixIndex(4, policy="mru")


TRACE = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "traces" / "conversation_trace.jsonl"


@pytest.mark.skipif(not TRACE.is_file(), reason="the shared Mooncake trace is not beside this checkout")
def test_unbounded_replay_of_the_mooncake_trace_reaches_its_ideal_hit_ratio():
    from benchmarks.trace_cache import replay
    from kvstore.trace import load_trace

    rows = load_trace(TRACE)
    out = replay(rows, None, "lru")
    assert out["requests"] == 12031
    assert abs(out["hit_ratio_tokens"] - 0.3736) < 5e-5  # ../shared/anchors.md
    bounded = replay(rows, 3_000_000, "lru")
    assert 0.10 < bounded["hit_ratio_tokens"] < out["hit_ratio_tokens"]
