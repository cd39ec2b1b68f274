"""The cache-hit tokens past the last whole block (token-granular reuse) reach every view of the cluster's
counters: ClusterStatus, `pdserve status`, the Prometheus gauges and the dashboard's JSON. Without them a short
chat's hits (44 tokens, under one 64-token block) showed as "delivered 0" while clients were told of cached tokens."""
from types import SimpleNamespace

from pdserve.gateway import status_message

COUNTERS = {"predicted_hit_tokens": 1856, "delivered_hit_tokens": 1856, "delivered_partial_tokens": 3152,
            "workers": {"prefill-0": {"role": "prefill", "queued_tokens": 0, "free_blocks": 5, "capacity": 8}}}


def test_status_and_pdserve_status_carry_partial_block_hits(capsys, monkeypatch):
    import pdserve.server_cli as cli

    status = status_message("skv-tiny", COUNTERS)
    assert (status.delivered_hit_tokens, status.delivered_partial_tokens) == (1856, 3152)
    assert [(w.free_blocks, w.capacity_blocks) for w in status.workers] == [(5, 8)]
    monkeypatch.setattr(cli, "_client", lambda args: SimpleNamespace(status=lambda: status))
    assert cli._status(SimpleNamespace()) == 0
    out = capsys.readouterr().out
    assert "predicted 1856, delivered 1856 (+3152 in partial blocks);" in out
    assert "free blocks 5/8" in out


def test_metrics_and_dashboard_carry_partial_block_hits():
    from pdserve.dashboard import Dashboard
    from pdserve.metrics import Metrics

    m = Metrics("skv-tiny")
    m.update_cluster(COUNTERS)
    assert m.registry.get_sample_value("pdserve:prefix_cache_hit_tokens_partial", {"model_name": "skv-tiny"}) == 3152
    door = SimpleNamespace(limits=SimpleNamespace(model="skv-tiny"), serving=True, live={},
                           metrics=SimpleNamespace(recent=SimpleNamespace(percentiles=lambda: {})))
    shaped = Dashboard(door).shape(COUNTERS)
    assert shaped["hits"] == {"predicted_tokens": 1856, "delivered_tokens": 1856, "partial_tokens": 3152}
    assert [(w["free_blocks"], w["capacity_blocks"]) for w in shaped["workers"]] == [(5, 8)]
