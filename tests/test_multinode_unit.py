"""Issue 17's logic without Ray: topology resolution and config, per-node cache views, the policy's
fetch-vs-recompute choice, the hot-block replication policy, per-node store events, and the store
handing another node only the KV the window still reads."""
import numpy as np
import pytest

from kvstore.blocks import BlockSpec, join_export
from kvstore.index import KVLayout
from kvstore.keys import block_keys
from kvstore.store import Event, KVStore, StoreConfig
from model.engine.block_pool import GroupBlocks, KVExport
from pdserve.config import ConfigError, parse
from pdserve.topology import NodeSpec, NodeWatch, Topology, TopologyError, resolve
from scheduler.conductor import Conductor
from scheduler.cost_model import CostModel
from scheduler.placement import ClusterView, PlacementRequest
from scheduler.policies import make_policy
from scheduler.replication import HotBlockReplication

BS = 64
COST = CostModel("unit", prefill_overhead_s=0.0, prefill_s_per_token=1e-3, prefill_s_per_pair=0.0,
                 decode_overhead_s=0.01, decode_weights_s=0.0, decode_s_per_seq=1e-3, decode_s_per_kv_byte=0.0,
                 kv_bytes_global_per_token=100.0, kv_bytes_local_per_token=0.0, net_bytes_per_s=1e9)
PROMPT = list(range(1000, 1000 + 20 * BS))
NODES = {"p0": "a", "p1": "b", "p2": "b", "d0": "a", "d1": "c"}
RAY_NODES = [{"NodeID": "id-a", "Alive": True, "NodeManagerAddress": "10.0.0.1", "Resources": {"box-a": 1.0}},
             {"NodeID": "id-b", "Alive": True, "NodeManagerAddress": "10.0.0.2", "Resources": {}},
             {"NodeID": "id-c", "Alive": False, "NodeManagerAddress": "10.0.0.3", "Resources": {"box-c": 1.0}}]


def request(tokens=PROMPT):
    return PlacementRequest("r", len(tokens), prompt=tuple(tokens))


# -- topology --------------------------------------------------------------------------------------
def test_nodes_are_found_by_resource_id_or_address_and_dead_ones_refused():
    topo = Topology((NodeSpec("a", "box-a", 1, 0), NodeSpec("b", "10.0.0.2", 0, 1)))
    assert [(p.name, p.node_id) for p in resolve(topo, RAY_NODES)] == [("a", "id-a"), ("b", "id-b")]
    assert resolve(Topology((NodeSpec("x", "id-b", 1, 1),)), RAY_NODES)[0].node_id == "id-b"
    with pytest.raises(TopologyError, match="no alive Ray node"):
        resolve(Topology((NodeSpec("c", "box-c", 1, 1),)), RAY_NODES)
    with pytest.raises(TopologyError, match="same Ray node"):
        resolve(Topology((NodeSpec("a", "box-a", 1, 0), NodeSpec("a2", "id-a", 0, 1))), RAY_NODES)
    with pytest.raises(TopologyError, match="at least one prefill and one decode"):
        resolve(Topology((NodeSpec("a", "box-a", 1, 0),)), RAY_NODES)


def test_every_node_takes_each_alive_node_with_the_per_node_counts():
    placed = resolve(Topology(every_node=True, prefill_per_node=2, decode_per_node=1), RAY_NODES)
    assert [(p.node_id, p.n_prefill, p.n_decode) for p in placed] == [("id-a", 2, 1), ("id-b", 2, 1)]


def test_topology_config_section():
    cfg = parse({"topology": {"nodes": [{"name": "a", "match": "box-a", "prefill": 2},
                                        {"name": "b", "decode": 1}]}})
    topo = cfg.topology.to_topology()
    assert topo.nodes == (NodeSpec("a", "box-a", 2, 0), NodeSpec("b", "", 0, 1))
    assert parse({}).topology.to_topology() is None  # no section: the single-node cluster
    assert parse({"topology": {"every_node": True}}).topology.to_topology().every_node
    for bad, message in [({"nodes": [{"name": "a", "gpus": 1}]}, "topology.nodes\\[0\\].gpus"),
                         ({"nodes": [{"name": "a"}, {"name": "a"}]}, "unique"),
                         ({"nodes": [{"name": "a", "prefill": "2"}]}, "integers"),
                         ({"every_node": True, "nodes": [{"name": "a"}]}, "not both"),
                         ({"replication_threshold": 0}, "replication_threshold")]:
        with pytest.raises(ConfigError, match=message):
            parse({"topology": bad})


def test_node_watch_reports_each_lost_node_once(monkeypatch):
    import ray

    alive = [{"NodeID": "id-a", "Alive": True}, {"NodeID": "id-b", "Alive": True}]
    monkeypatch.setattr(ray, "nodes", lambda: alive)
    lost = []
    watch = NodeWatch({"a": "id-a", "b": "id-b"}, lost.append, interval_s=0.0)
    watch.check()
    alive[1] = {"NodeID": "id-b", "Alive": False}
    watch.check()
    watch.check()
    assert lost == ["b"]


# -- the view and the policy -----------------------------------------------------------------------
def node_view(held: dict[str, int]) -> ClusterView:
    """Prefill p0 on node a, p1 and p2 on node b; ``held``: node -> tokens of PROMPT its store holds."""
    view = ClusterView(["p0", "p1", "p2"], ["d0", "d1"], block_size=BS, nodes=dict(NODES))
    for node, tokens in held.items():
        view.cache_insert(node, block_keys(0, PROMPT[:tokens], BS), tokens)
    return view


def test_workers_of_one_node_share_its_cache_and_a_decode_node_holds_blocks_too():
    view = node_view({"b": 8 * BS, "c": 12 * BS})
    assert view.prefill_state["p1"].cache is view.prefill_state["p2"].cache
    assert view.prefix_tokens(request()) == {"p0": 0, "p1": 8 * BS, "p2": 8 * BS}
    assert view.best_holder(request()) == ("c", 12 * BS)
    view.forget_holder("c")
    assert view.best_holder(request()) == ("b", 8 * BS)
    assert all("c" not in h for h in view.locator.holders.values())


def test_cache_aware_fetches_from_another_node_when_that_beats_recomputing():
    policy = make_policy("cache_aware", COST)
    policy.remote_fetch = True
    view = node_view({"c": 16 * BS})  # only the decode node c holds the prefix; p0 idle
    got = policy.place(request(), view)
    assert got.fetch_from == "c" and got.predicted_hit_tokens == 16 * BS
    fetch = COST.transfer_time(COST.kv_bytes(16 * BS))
    assert got.predicted_ttft_s == pytest.approx(COST.prefill_time(4 * BS, 16 * BS) + fetch)
    slow = CostModel(**{**COST.__dict__, "net_bytes_per_s": 1e3})  # a network slower than recomputing
    policy = make_policy("cache_aware", slow)
    policy.remote_fetch = True
    got = policy.place(request(), node_view({"c": 16 * BS}))
    assert got.fetch_from is None and got.predicted_hit_tokens == 0
    off = make_policy("cache_aware", COST).place(request(), node_view({"c": 16 * BS}))  # the simulator's
    assert off.fetch_from is None


def test_mooncake_names_the_node_to_fetch_from():
    view = node_view({"b": 16 * BS})
    view.prefill_state["p1"].busy_until = view.prefill_state["p2"].busy_until = 50.0
    got = make_policy("mooncake", COST, reject=False).place(request(), view)
    assert (got.prefill, got.fetch_from, got.predicted_hit_tokens) == ("p0", "b", 16 * BS)


# -- replication -----------------------------------------------------------------------------------
def test_a_prefix_fetched_threshold_times_is_copied_once_to_each_node_lacking_it():
    rep = HotBlockReplication(threshold=3, block_size=BS)
    keys = block_keys(0, PROMPT[:6 * BS], BS)
    held = {"b": 2}
    holds = lambda target, run: min(held.get(target, 0), len(run))  # noqa: E731
    assert rep.fetched("a", keys, ["a", "b", "c"], holds) == []
    assert rep.fetched("a", keys[:4], ["a", "b", "c"], holds) == []
    orders = rep.fetched("a", keys, ["a", "b", "c"], holds)  # keys[:4] fetched 3 times, the rest twice
    assert [(o.source, o.target, o.keys, o.tokens) for o in orders] == [
        ("a", "b", tuple(keys[:4]), 4 * BS), ("a", "c", tuple(keys[:4]), 4 * BS)]
    assert rep.fetched("a", keys[:4], ["a", "b", "c"], holds) == []  # ordered already


def test_conductor_counts_cross_node_handoffs_and_forgets_a_lost_node():
    c = Conductor(make_policy("cache_aware", COST), COST, ["p0", "p1", "p2"], ["d0", "d1"], BS, 0,
                  nodes=dict(NODES), replication=HotBlockReplication(2, BS))
    prompt = PROMPT[:4 * BS]
    keys = block_keys(0, prompt, BS)
    for i in range(2):
        c.mark_down("d0")  # decode on node c: every handoff from a crosses
        c.mark_down("p1"), c.mark_down("p2")
        got = c.place(PlacementRequest(f"r{i}", len(prompt), prompt=tuple(prompt)))
        assert (got.prefill, got.decode) == ("p0", "d1")
        c.prefilled(f"r{i}", keys, len(prompt), 0)
        c.finished(f"r{i}", prompt)  # published by d1 into node c's store
    assert c.view.locator.prefix_blocks(keys, ["a", "b", "c"]) == {"a": 4, "b": 0, "c": 4}
    orders = c.take_replications()
    assert [(o.source, o.target) for o in orders] == [("a", "b")]
    c.replicated(orders[0], keys, 4 * BS)
    assert c.stats()["replicated_blocks"] == 4 and c.view.locator.prefix_blocks(keys, ["b"]) == {"b": 4}
    c.apply_events([Event("removed", keys[2], "b", "host")])  # b's store evicted one: only b forgets
    assert c.view.locator.prefix_blocks(keys, ["a", "b"]) == {"a": 4, "b": 2}
    c.forget_node("a")
    assert c.all_prefill == ["p1", "p2"] and c.all_decode == ["d1"]
    assert c.view.locator.prefix_blocks(keys, ["a", "c"]) == {"a": 0, "c": 4}


# -- invariant 3 across nodes ----------------------------------------------------------------------
def test_a_remote_reader_gets_only_the_kv_the_window_still_reads():
    spec = BlockSpec(block_size=4, n_kv_heads=1, head_dim=8, n_groups=2)
    layout = KVLayout(global_mask=1, local=((2, 8),))  # group 1 is local with a window of 8 tokens
    rng = np.random.default_rng(0)
    nb = 6
    groups = [GroupBlocks(0, rng.integers(-127, 128, (nb, *spec.kv_shape), dtype=np.int8),
                          rng.integers(-127, 128, (nb, *spec.kv_shape), dtype=np.int8),
                          rng.random((nb, *spec.scale_shape), dtype=np.float32),
                          rng.random((nb, *spec.scale_shape), dtype=np.float32)) for _ in range(2)]
    data = KVExport(4, 0, 24, groups)  # the local group holds every block (a fuller copy than needed)
    store = KVStore(spec, 7, layout, StoreConfig(host_capacity_blocks=64))
    tokens = list(range(24))
    store.put(tokens, data, 7)
    m = store.match(tokens)
    assert m.tokens == 24
    whole = store.get_refs(m.keys)
    trimmed = store.get_refs(m.keys, end=24)
    assert [mask for mask, _ in whole] == [3] * 6
    assert [mask for mask, _ in trimmed] == [1, 1, 1, 1, 3, 3]  # the window reads blocks 4 and 5 only
    sent = sum(buf.nbytes for _, buf in trimmed)
    assert sent == 4 * spec.group_bytes + 2 * 2 * spec.group_bytes
    assert store.snapshot()["trimmed_bytes"] == 4 * spec.group_bytes
    out = join_export(spec, trimmed, 24)
    np.testing.assert_array_equal(out.groups[0].k, groups[0].k)
    assert out.groups[1].first_block == 4
    np.testing.assert_array_equal(out.groups[1].k, groups[1].k[4:])
    np.testing.assert_array_equal(out.groups[1].v_scale, groups[1].v_scale[4:])


def test_status_message_carries_each_node_with_its_store_and_workers():
    from pdserve.gateway import status_message

    store = {"blocks": {"host": 5, "disk": 1}, "bytes": {"host": 500, "disk": 100}, "hit_tokens": {"host": 64, "disk": 0},
             "bytes_in": 10, "bytes_out": 20, "replicated_blocks": 4, "state": "alive"}
    s = {"workers": {"prefill-0": {"role": "prefill", "node": "a", "transfer_slowdown": 3.5},
                     "decode-0": {"role": "decode", "node": "b"}},
         "nodes": {"a": {"state": "alive", "ray_node_id": "id-a", "workers": ["prefill-0"], "store": store},
                   "b": {"state": "lost", "ray_node_id": "id-b", "workers": ["decode-0"]}}}
    msg = status_message("skv-tiny", s)
    assert [w.node for w in msg.workers] == ["a", "b"]
    assert [w.transfer_slowdown for w in msg.workers] == [3.5, 1.0]
    a, b = msg.nodes
    assert (a.name, a.state, a.store_state, a.blocks, a.bytes, a.hit_tokens, a.bytes_transferred,
            a.replicated_blocks, list(a.workers)) == ("a", "alive", "alive", 6, 600, 64, 30, 4, ["prefill-0"])
    assert (b.state, b.store_state) == ("lost", "dead")
    one = status_message("skv-tiny", {"nodes": {"node-0": {"state": "alive", "store": store}}})
    assert not one.nodes  # one node: the store line says it all


def test_the_simulator_runs_the_same_policy_with_caches_per_node():
    from scheduler.simulator import SimConfig, SimRequest, Simulator

    prefix = list(range(8 * BS))
    reqs = [SimRequest(1.0 * i, 10 * BS, 4, tuple(block_keys(0, prefix + [i] * 2 * BS, BS))) for i in range(12)]
    hits = {}
    for n_nodes in (1, 2):
        policy = make_policy("cache_aware", COST)
        policy.remote_fetch = True
        sim = Simulator(reqs, policy, COST, SimConfig(n_prefill=4, n_decode=2, block_size=BS, n_nodes=n_nodes))
        records = sim.run()
        assert len(records) == 12 and all(r.done is not None for r in records)
        caches = {id(sim.view.prefill_state[p].cache) for p in sim.view.prefill}
        assert len(caches) == n_nodes  # the instances of one node share its cache
        hits[n_nodes] = sum(r.delivered_hit for r in records)
        assert hits[n_nodes] == sum(r.predicted_hit for r in records)
    assert hits[1] == hits[2] == 11 * 8 * BS  # every request after the first reuses the prefix (fetched or local)


def test_node_loss_and_replications_are_prometheus_counters():
    from prometheus_client import generate_latest

    from pdserve.metrics import Metrics

    m = Metrics("skv-tiny")
    m.update_cluster({"counters": {"nodes_lost": 1, "replications": 3}})
    m.update_cluster({"counters": {"nodes_lost": 1, "replications": 5}})
    text = generate_latest(m.registry).decode()
    assert 'pdserve:nodes_lost_total{model_name="skv-tiny"} 1.0' in text
    assert 'pdserve:kv_replications_total{model_name="skv-tiny"} 5.0' in text


def test_fetches_slower_than_the_model_make_the_conductor_recompute_instead():
    """The model's network moves a 16-block prefix in about half the time recomputing it takes; the worker's
    fetches take 3x the model's time. After three of them its ``transfer_slowdown`` says so and the prefix is
    computed again instead (the CPU fallback guesses 1 GB/s; two raylets on one loaded VM moved 0.2 GB/s)."""
    cost = CostModel(**{**COST.__dict__, "net_bytes_per_s": 2e5})
    c = Conductor(make_policy("cache_aware", cost), cost, ["p0", "p1", "p2"], ["d0", "d1"], BS, 0,
                  nodes=dict(NODES), clock=lambda: 0.0)
    c.policy.remote_fetch = True
    c.mark_down("p1"), c.mark_down("p2")
    fetch = cost.transfer_time(cost.kv_bytes(16 * BS))
    assert 0.3 < fetch / cost.prefill_time(16 * BS) < 0.7
    placed = []
    for i in range(5):
        prompt = [10_000 * (i + 1) + t for t in range(20 * BS)]
        c.view.cache_insert("c", block_keys(0, prompt[:16 * BS], BS), 16 * BS)  # only node c holds it
        got = c.place(PlacementRequest(f"r{i}", len(prompt), prompt=tuple(prompt)))
        placed.append(got.fetch_from)
        if got.fetch_from:
            c.prefilled(f"r{i}", [], 0, 16 * BS, remote_tokens=16 * BS, fetch_s=3 * fetch)
    assert placed == ["c", "c", "c", None, None]
    assert c.view.prefill_state["p0"].transfer_slowdown == pytest.approx(3.0)
    assert c.view.prefill_state["p0"].slowdown == 1.0  # the prefill figure is not the transfer's
    c.mark_down("p0"), c.mark_up("p0")  # a worker back in placement starts over
    assert c.view.prefill_state["p0"].transfer_slowdown == 1.0
