"""A cluster of several Ray nodes on one machine (issue 17): ``ray.cluster_utils.Cluster`` starts
three raylets on 127.0.0.1 (node a is the head), each with its own object store, and pdserve pins one KV
store per node and its workers there (skv-tiny, default int8: batch-invariant, so a request whose KV
crosses nodes must give the single-node tokens exactly).

    node a: prefill-0, decode-0      node b: prefill-1, decode-1      node c: decode-2

The tests steer placement by taking workers out of it for a moment (``only``), the way a drained
worker is. One cluster serves the whole module; the node-loss test runs last, since it removes
node c for good.
"""
import contextlib
import time

import pytest

from alone import skv_tiny_alone
from model.config import QuantConfig
from model.engine import SamplingParams
from pdserve.config import Resilience
from pdserve.topology import NodeSpec, Topology
from streams import stream_all

pytestmark = pytest.mark.slow

PARAMS = SamplingParams(max_tokens=12, ignore_eos=True)
HOT_AFTER = 3  # cross-node fetches of a prefix before it is copied to the other nodes
NODE_ARGS = dict(num_cpus=1, object_store_memory=100 * 2**20, node_ip_address="127.0.0.1")


@pytest.fixture(scope="module")
def ray_nodes():
    import ray
    from ray.cluster_utils import Cluster

    # node a is the head: three raylets, not four, and still three nodes with workers and a store each
    # (node c, which the last test removes, is not the head)
    c = Cluster(initialize_head=True, head_node_args=dict(include_dashboard=False, resources={"test-node-a": 1},
                                                          **NODE_ARGS))
    try:
        nodes = {"a": c.head_node, **{name: c.add_node(resources={f"test-node-{name}": 1}, **NODE_ARGS)
                                      for name in "bc"}}
        ray.init(address=c.address, log_to_driver=False)
        yield c, nodes
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def cluster(ray_nodes):
    from pdserve.cluster import LocalCluster

    topo = Topology(nodes=(NodeSpec("a", "test-node-a", n_prefill=1, n_decode=1),
                           NodeSpec("b", "test-node-b", n_prefill=1, n_decode=1),
                           NodeSpec("c", "test-node-c", n_decode=1)))
    with LocalCluster("skv-tiny", quant=QuantConfig(), topology=topo, replication_threshold=HOT_AFTER,
                      resilience=Resilience(stall_timeout_s=15.0, recovery_timeout_s=60.0,
                                            admission_wait_s=5.0)) as c:
        yield c


@pytest.fixture(scope="module")
def reference():
    """The single-node run: the paged engine serving each prompt alone in this process."""
    with skv_tiny_alone(PARAMS) as run:
        yield run


@contextlib.contextmanager
def only(cluster, *names):
    """Placement sees only ``names`` meanwhile (the others are drained, not stopped)."""
    others = [n for n in [*cluster.prefill, *cluster.decode] if n not in names]
    for n in others:
        cluster.conductor.mark_down(n)
    try:
        yield
    finally:
        for n in others:
            if n in cluster.conductor.all_prefill or n in cluster.conductor.all_decode:
                cluster.conductor.mark_up(n)


def run(cluster, prompt, params=PARAMS, session=None):
    sub = cluster.submit(prompt, params, session)
    tokens = [t for out in cluster.stream(sub) for t in out.token_ids]
    return tokens, sub


def test_workers_and_stores_are_pinned_to_their_nodes(cluster, ray_nodes):
    _, nodes = ray_nodes
    ids = {name: n.node_id for name, n in nodes.items()}
    assert cluster.node_of == {"prefill-0": "a", "decode-0": "a", "prefill-1": "b", "decode-1": "b", "decode-2": "c"}
    for node, store in cluster.stores.items():
        assert cluster.ray.get(store.node_id.remote(), timeout=30) == ids[node]
    s = cluster.status()
    assert set(s["nodes"]) == {"a", "b", "c"}
    assert s["nodes"]["c"]["workers"] == ["decode-2"] and s["nodes"]["a"]["store"]["state"] == "alive"
    assert all(s["workers"][w]["node"] == n for w, n in cluster.node_of.items())


def test_kv_crosses_nodes_and_tokens_equal_the_single_node_run(cluster, reference):
    prompt = list(range(5, 5 + 70))  # 4 whole blocks and a partial one (block 16)
    with only(cluster, "prefill-0", "decode-1"):  # prefill on a, decode on b
        tokens, sub = run(cluster, prompt)
    assert (sub.placement.prefill, sub.placement.decode) == ("prefill-0", "decode-1")
    handoff = sub.handoff.result()
    assert handoff.kv_tokens == len(prompt) and handoff.keys  # decode read them from a's store
    assert tokens == reference(prompt)
    loads = cluster.loads()
    assert loads["decode-1"]["recomputed_tokens"] == 0 and loads["decode-1"]["kv_load_failures"] == 0
    a = cluster.ray.get(cluster.stores["a"].snapshot.remote(), timeout=30)
    assert a["bytes_out"] > 0 and a["live_leases"] == 0  # read across nodes, lease released from b


def test_a_later_turn_on_node_b_hits_what_node_a_holds(cluster, reference):
    turn1 = list(range(100, 100 + 50))
    with only(cluster, "prefill-0", "decode-0"):  # everything of turn 1 stays on node a
        answer, _ = run(cluster, turn1, session="s-remote")
    turn2 = turn1 + answer + list(range(300, 320))
    before = cluster.conductor.stats()
    with only(cluster, "prefill-1", "decode-1"):  # turn 2 on node b
        tokens, sub = run(cluster, turn2, session="s-remote")
    p = sub.placement
    assert (p.prefill, p.fetch_from) == ("prefill-1", "a")  # b's store has nothing of it: fetched from a
    handoff = sub.handoff.result()
    after = cluster.conductor.stats()
    predicted = after["predicted_hit_tokens"] - before["predicted_hit_tokens"]
    delivered = after["delivered_hit_tokens"] - before["delivered_hit_tokens"]
    assert predicted == p.predicted_hit_tokens == delivered > 0
    assert handoff.remote_tokens >= delivered and handoff.cached_tokens >= delivered
    fetches = cluster.conductor.correction.sums[("transfer", "prefill-1")]  # the fetch's time corrects the model's
    assert fetches.seen >= 1 and fetches.observed > 0 and handoff.timings["load_prefix"] > 0
    shown = cluster.status()["workers"]["prefill-1"]["transfer_slowdown"]
    assert shown == cluster.conductor.transfer_slowdowns()["prefill-1"] > 0
    assert tokens == reference(turn2)


def test_a_fetch_from_another_node_that_fails_is_recomputed_and_is_no_transfer_time(cluster, reference):
    """The cross-node read fails on node b's prefill worker: the prefix is computed again (the same tokens), and
    the Conductor's transfer correction takes nothing from it (the time went to a failure, not to moving KV)."""
    turn1 = list(range(450, 450 + 50))
    with only(cluster, "prefill-0", "decode-0"):
        answer, _ = run(cluster, turn1, session="s-fail")
    turn2 = turn1 + answer + list(range(20, 30))
    seen = getattr(cluster.conductor.correction.sums.get(("transfer", "prefill-1")), "seen", 0)
    cluster.arm_fault("prefill-1", "kv.fetch", "raise")
    with only(cluster, "prefill-1", "decode-1"):
        tokens, sub = run(cluster, turn2, session="s-fail")
    handoff = sub.handoff.result()
    assert sub.placement.fetch_from == "a"  # placed to fetch, and the fetch failed
    assert handoff.remote_tokens == 0 and handoff.recomputed_tokens > 0
    assert getattr(cluster.conductor.correction.sums.get(("transfer", "prefill-1")), "seen", 0) == seen
    assert tokens == reference(turn2)


def test_a_hot_prefix_is_replicated_and_then_read_locally(cluster, reference):
    hot = list(range(400, 400 + 64))  # 4 blocks every request shares
    prompts = [hot + [10 + i, 20 + i, 30 + i] for i in range(HOT_AFTER)]
    with only(cluster, "prefill-0", "decode-2"):  # prefill on a, decode on c: every handoff crosses
        for prompt in prompts:
            assert run(cluster, prompt)[0] == reference(prompt)
    deadline = time.monotonic() + 30
    while cluster.conductor.stats()["replicated_blocks"] < 4 and time.monotonic() < deadline:
        time.sleep(0.2)  # the copy runs in the background
    assert cluster.conductor.stats()["replicated_blocks"] >= 4
    b = cluster.ray.get(cluster.stores["b"].snapshot.remote(), timeout=30)
    assert b["replicated_blocks"] >= 4  # node b never served this prefix: it got a copy
    prompt = hot + [50, 60, 70]
    with only(cluster, "prefill-1", "decode-1"):
        tokens, sub = run(cluster, prompt)
    handoff = sub.handoff.result()
    assert sub.placement.fetch_from is None and handoff.remote_tokens == 0  # no longer crosses nodes
    assert handoff.cached_tokens >= len(hot)
    assert tokens == reference(prompt)


def test_losing_the_node_of_a_decode_worker_mid_run(cluster, ray_nodes, reference):
    """Last: node c leaves for good. Its streams move to the other decode workers (issue 16's
    migration) with the fault-free tokens; the cluster forgets c and serves new requests."""
    c, nodes = ray_nodes
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    prompts = [[(13 * i + 5 * j) % 500 + 3 for j in range(30 + 3 * i)] for i in range(6)]
    # decode steps on c slowed to >= 0.1 s, so the node surely leaves mid-stream on any machine
    cluster.arm_fault("decode-2", "decode.step", "delay", times=10_000, seconds=0.1)
    with only(cluster, "prefill-0", "prefill-1", "decode-2"):
        subs = [cluster.submit(p, params) for p in prompts]
        for s in subs:
            s.handoff.result()
    assert all(s.placement.decode == "decode-2" for s in subs)

    def lose_node_c():
        c.remove_node(nodes["c"])

    t0 = time.monotonic()
    got = stream_all(cluster, subs, on_first=lose_node_c)
    print(f"6 streams done {time.monotonic() - t0:.1f}s after node c left")
    assert got == [reference(p, params) for p in prompts]
    assert cluster.counters.snapshot()["migrations"] >= 1
    deadline = time.monotonic() + 30
    while cluster.counters.snapshot()["nodes_lost"] == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    s = cluster.status()
    assert s["nodes"]["c"]["state"] == "lost" and s["workers"]["decode-2"]["state"] == "dead"
    assert "decode-2" not in cluster.conductor.view.decode and "c" not in cluster.conductor.view.locator.holders
    assert "c" not in {h for hs in cluster.conductor.view.locator.holders.values() for h in hs}
    prompt = list(range(470, 510))
    tokens, sub = run(cluster, prompt)
    assert sub.placement.decode in ("decode-0", "decode-1") and tokens == reference(prompt)
    assert s["serving"]
