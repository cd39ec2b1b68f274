"""The Conductor in the live cluster: with 2 prefill workers and cache-aware placement (no session
ids to lean on), the later turns of each conversation land on the worker that holds their KV, and
the predicted hits match the hits the workers deliver."""
import pytest

from model.config import QuantConfig
from model.engine import SamplingParams

W8A8KV8 = QuantConfig()  # the default: batch-invariant, so clusters give the model's tokens exactly


@pytest.fixture(scope="module")
def cluster():
    from pdserve.cluster import LocalCluster

    with LocalCluster("skv-tiny", quant=W8A8KV8, n_prefill=2, n_decode=1, policy="cache_aware") as c:
        yield c


def run_turn(cluster, history, params):
    sub = cluster.submit(history, params)
    tokens = [t for out in cluster.stream(sub) for t in out.token_ids]
    return sub, tokens, sub.handoff.result()


def test_later_turns_land_where_their_kv_is(cluster):
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    histories = {"a": list(range(100, 160)), "b": list(range(300, 360))}
    # first turns one on each worker, steered (placing them by the predicted queue raced the first prefill: a
    # 22 ms prediction, and a pause of the test process between the two submits put both on prefill-0)
    first = {}
    for k, other in (("a", "prefill-1"), ("b", "prefill-0")):
        cluster.conductor.mark_down(other)
        try:
            first[k] = cluster.submit(histories[k], params)
        finally:
            cluster.conductor.mark_up(other)
    home = {k: s.placement.prefill for k, s in first.items()}
    assert home == {"a": "prefill-0", "b": "prefill-1"}
    for k, s in first.items():
        histories[k] = histories[k] + [t for out in cluster.stream(s) for t in out.token_ids]
    bs = cluster.model_config.block_size
    for turn in range(3):
        for k in ("a", "b"):
            histories[k] = histories[k] + [400 + turn, 401, 402]
            sub, tokens, handoff = run_turn(cluster, histories[k], params)
            assert sub.placement.prefill == home[k], f"turn {turn + 2} of {k} left its KV"
            prev = len(histories[k]) - 3
            assert sub.placement.predicted_hit_tokens == prev // bs * bs  # the published whole blocks
            assert handoff.cached_tokens >= sub.placement.predicted_hit_tokens
            histories[k] = histories[k] + tokens
    status = cluster.status()
    for key in ("workers", "store", "policy", "predicted_hit_tokens", "delivered_hit_tokens", "requests"):
        assert key in status
    assert status["policy"] == "cache_aware" and status["requests"] == 8
    assert 0 < status["predicted_hit_tokens"] <= status["delivered_hit_tokens"]
    assert status["store"]["live_leases"] == 0
    cost = cluster.conductor.cost  # the CPU fallback (no calibration here) with the served model's KV sizes
    assert cost is cluster.cost_model is cluster.policy.cost and cost.name == "cpu-fallback"
    assert cost.kv_bytes(64 * bs) == pytest.approx(cluster.model_config.kv_bytes(64 * bs), rel=0.05)


def test_unknown_policy_is_refused_before_anything_starts():
    from pdserve.cluster import LocalCluster

    with pytest.raises(ValueError, match="unknown policy 'nearest'; valid policies: random"):
        LocalCluster("skv-tiny", quant=W8A8KV8, policy="nearest")
