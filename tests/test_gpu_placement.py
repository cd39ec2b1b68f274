"""Workers on GPUs, tested on a CPU machine: a local Ray declares two GPUs (as Ray's own tests do),
a prefill and a decode worker take half a GPU each with device "cpu", and the cluster places them,
reports their GPU ids, still serves the model's tokens, and refuses what it cannot hold or run at
once, with the config keys in its message, instead of leaving actors pending.

One cluster for the module, built the way `pdserve up` builds it; the refusals join its Ray."""
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from greedy import assert_same_greedy
from model.engine import SamplingParams
from model.generate import generate
from model.loader import load
from pdserve.cluster import LocalCluster, ResourceError, gpus_needed, worker_device
from pdserve.config import parse


@pytest.fixture(scope="module")
def placed():
    from pdserve.server import build_cluster

    cfg = parse({"cluster": {"model": "skv-tiny", "num_cpus": 2, "num_gpus": 2, "device": "cpu",
                             "prefill_num_gpus": 0.5, "decode_num_gpus": 0.5, "kv_cache_bytes": 16 * 2**20}})
    cluster = build_cluster(cfg, None)
    try:
        assert cluster.owns_ray  # a Ray of its own, on 127.0.0.1, that shutdown() stops
        yield cluster
    finally:
        cluster.shutdown()


def gpus_free(cluster) -> float:
    return cluster.ray.available_resources().get("GPU", 0.0)


def refusal(timeout_s: float, **kwargs) -> BaseException:
    """The exception a LocalCluster on the running Ray raises; fails the test if it takes longer
    than ``timeout_s`` (the hang this guards against: Ray keeping actors pending for GPUs)."""
    outcome: dict = {}

    def build() -> None:
        try:
            LocalCluster("skv-tiny", **kwargs).shutdown()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            outcome["error"] = e

    thread = threading.Thread(target=build, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"LocalCluster{kwargs} neither started nor failed within {timeout_s} s"
    assert "error" in outcome, f"LocalCluster{kwargs} started"
    return outcome["error"]


@pytest.mark.slow
def test_workers_hold_half_a_gpu_each_and_report_it(placed):
    from pdserve.gateway import status_message

    assert placed.ray.cluster_resources()["GPU"] == 2.0  # cluster.num_gpus reached the local Ray
    assert gpus_free(placed) == 1.0
    for name, info in placed.workers.items():
        assert info.device == "cpu" and len(info.gpu_ids) == 1 and info.gpu_ids[0] in ("0", "1"), (name, info)
    status = placed.status()["workers"]
    assert {n: (w["device"], w["gpu_ids"]) for n, w in status.items()} == \
        {n: ("cpu", list(i.gpu_ids)) for n, i in placed.workers.items()}
    shown = status_message("skv-tiny", placed.status()).workers
    assert {(w.name, w.device, tuple(w.gpu_ids)) for w in shown} == \
        {(n, i.device, i.gpu_ids) for n, i in placed.workers.items()}


@pytest.mark.slow
def test_placed_workers_still_serve_the_models_greedy_tokens(placed):
    ref = load("skv-tiny").model  # the precision `pdserve up` serves (w8-a8-kv8)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    for prompt in (list(range(3, 40)), list(range(50, 61))):
        tokens, last, _ = placed.generate(prompt, params)
        assert last.finished and len(tokens) == 8
        assert_same_greedy(ref, prompt, list(generate(ref, prompt, params)), tokens)


@pytest.mark.slow
def test_more_gpu_than_the_cluster_has_is_refused_at_once(placed):
    t0 = time.monotonic()
    e = refusal(30, n_prefill=2, prefill_num_gpus=1.0, decode_num_gpus=0.5)
    assert type(e) is ResourceError, repr(e)
    assert "cluster.prefill_num_gpus = 1" in str(e) and "fill 3 GPU(s), but the Ray cluster has 2" in str(e)
    assert time.monotonic() - t0 < 10  # refused before any actor or model load
    assert gpus_free(placed) == 1.0


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch sees no CUDA device")
def test_cuda_where_torch_sees_none_is_a_clear_error(placed):
    e = refusal(120, device="cuda", prefill_num_gpus=0.5, decode_num_gpus=0.5)
    assert type(e) is ResourceError, repr(e)  # the worker's own error, not Ray's wrapper around it
    assert str(e).startswith("config key cluster.device = 'cuda', but torch") and "sees no CUDA device" in str(e)
    assert "Traceback" not in str(e)
    deadline = time.monotonic() + 30  # the failed workers were killed: their GPU shares come back
    while gpus_free(placed) != 1.0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert gpus_free(placed) == 1.0


def test_gpu_shares_pack_largest_first_one_gpu_at_most_per_worker():
    assert gpus_needed([0.5, 0.5]) == 1
    assert gpus_needed([1.0, 1.0, 0.0]) == 2
    assert gpus_needed([0.6, 0.6, 0.4, 0.4]) == 2
    assert gpus_needed([0.6] * 3) == 3
    assert gpus_needed([0.1] * 10) == 1  # in Ray's fixed point, not float sums
    assert gpus_needed([0.0, 0.0]) == 0


def test_worker_device_follows_the_gpu_share_and_cuda():
    cuda = torch.cuda.is_available()
    assert worker_device("cpu", ("0",)) == "cpu"
    assert worker_device("auto", ()) == "cpu"
    assert worker_device("auto", ("0",)) == ("cuda" if cuda else "cpu")
    if cuda:
        assert worker_device("cuda", ("0",)) == "cuda"
    else:
        with pytest.raises(ResourceError, match="cluster.device = 'cuda'.*CUDA_VISIBLE_DEVICES"):
            worker_device("cuda", ("0",))


def test_cluster_checks_the_gpu_keys_as_the_config_does():
    from pdserve.config import ConfigError

    with pytest.raises(ConfigError, match="cluster.device = 'cuda' needs a GPU share for every worker"):
        LocalCluster("skv-tiny", device="cuda", prefill_num_gpus=0.5)
    with pytest.raises(ConfigError, match="cluster.decode_num_gpus must be in 0..1"):
        LocalCluster("skv-tiny", decode_num_gpus=2.0)


def test_pdserve_status_prints_each_workers_device_and_gpus(capsys, monkeypatch):
    import pdserve.server_cli as cli
    from pdserve.gateway import status_message

    workers = {"prefill-0": {"queued_tokens": 0, "free_blocks": 4, "device": "cuda:0", "gpu_ids": ["1"]},
               "decode-0": {"running": 0, "waiting": 0, "free_blocks": 4, "capacity": 4, "device": "cpu",
                            "gpu_ids": []}}
    status = status_message("skv-tiny", {"workers": workers})  # what ClusterStatus sends
    monkeypatch.setattr(cli, "_client", lambda args: SimpleNamespace(status=lambda: status))
    assert cli._status(SimpleNamespace()) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "cuda:0 GPU 1" in next(line for line in lines if "prefill-0" in line)
    assert " cpu " in next(line for line in lines if "decode-0" in line)
