"""Two Ray nodes on 127.0.0.1: a block put on one node's store is fetched intact from the other."""
import os

import numpy as np
import pytest

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def two_nodes():
    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0"  # set by conftest before Ray loads
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"node_a": 1}, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    cluster.add_node(num_cpus=1, resources={"node_b": 1}, node_ip_address="127.0.0.1")
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_block_put_on_one_node_is_fetched_intact_on_the_other(two_nodes):
    from kvstore.actor import start_store
    from kvstore.blocks import BlockSpec
    from kvstore.index import KVLayout
    from kvstore.store import StoreConfig
    from test_kvstore_store import FP, SPEC, export, same

    store_a = start_store(SPEC, FP, KVLayout(global_mask=3), StoreConfig(node="a"), resources={"node_a": 0.01})
    data = export(10, seed=42)
    tokens = list(range(100, 110))
    assert len(ray.get(store_a.put.remote(tokens, data, FP), timeout=120)) == 3

    @ray.remote(num_cpus=0, resources={"node_b": 0.01})
    def fetch(store, tokens):
        m = ray.get(store.match.remote(tokens))
        return ray.get(store.get.remote(m.keys, m.tokens)), ray.get_runtime_context().get_node_id()

    got, reader_node = ray.get(fetch.remote(store_a, tokens), timeout=120)
    assert reader_node != ray.get(store_a.node_id.remote(), timeout=60)
    same(got, data)
    assert isinstance(got.groups[0].k, np.ndarray)
    events = ray.get(store_a.drain_events.remote(), timeout=60)
    assert {(e.kind, e.node, e.tier) for e in events} == {("stored", "a", "host")}
    ray.kill(store_a)


def test_ray_listens_on_loopback_only(two_nodes):
    import shutil
    import subprocess

    if shutil.which("ss") is None:
        pytest.skip("ss is not installed")
    lines = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, timeout=30).stdout.splitlines()
    ray_lines = [ln for ln in lines if "raylet" in ln or "gcs_server" in ln]
    assert ray_lines
    for ln in ray_lines:
        addr = ln.split()[3]
        assert addr.startswith(("127.", "[::ffff:127.", "[::1]")), ln
