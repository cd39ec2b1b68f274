"""The GPU path without a GPU: random-weight models, the allocator, the engine on the Triton kernels
(under the interpreter), and the device session's dry run, which CI runs end to end."""
import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernels.triton_* import, as in triton_device

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from benchmarks.gpu_engine import max_batch  # noqa: E402
from model.config import ModelConfig, QuantConfig, shared_kv_layers  # noqa: E402
from model.engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from model.engine.block_pool import blocks_per_group  # noqa: E402
from model.loader import build, load, random_state  # noqa: E402
from model.presets import get_preset  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MICRO = ModelConfig(name="micro", vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
                    ffn_dim=32, max_seq_len=256, block_size=16,
                    layers=shared_kv_layers(2, local_per_global=1, window=20))


def test_random_weights_build_an_analytic_preset_that_runs():
    assert load("skv-tiny").model.config.weights is None
    with pytest.raises(ValueError, match="analytic config"):
        load("cai-13b-skv")
    model = load("skv-tiny", random_weights=True, seed=3).model
    codes = model.layers[0].self_attn.qkv_proj.weight_q
    assert codes.dtype == torch.int8 and int(codes.min()) == -127 and int(codes.max()) == 127
    from model.kv_cache import ContiguousKVCache

    out = model(torch.arange(3, 40), ContiguousKVCache(model.config, 37).extend(37))
    assert torch.isfinite(out).all() and 0.1 < float(out.std()) < 100.0  # unit-scale activations, not 0 or blow-up


def test_a_cuda_device_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="sees no CUDA device"):
        load("skv-tiny", device="cuda")


def test_allocator_gives_global_groups_the_memory_local_groups_cannot_use():
    cfg = get_preset("cai-13b-skv")
    budget, max_seqs = 40 * 2**30, 64
    counts = blocks_per_group(cfg, budget, max_seqs, 512)
    per_block = cfg.block_size * cfg.kv_bytes_per_token_per_group
    local = [c for g, c in zip(cfg.kv_groups, counts) if g.window is not None]
    glob = [c for g, c in zip(cfg.kv_groups, counts) if g.window is None]
    cap = max_seqs * (1024 // 64 + 2) + 512 // 64 + 1
    assert set(local) == {cap} and len(set(glob)) == 1
    assert sum(counts) * per_block <= budget < (sum(counts) + len(glob)) * per_block  # all of it, in blocks
    assert glob[0] > 10 * cap  # an equal split would have given every group budget / 24


def test_max_batch_is_exactly_what_the_engine_can_hold():
    from benchmarks.gpu_engine import _decoding_engine

    model = load("skv-tiny").model
    cfg, budget, context = model.config, 256 * 1024, 100
    fit = max_batch(cfg, budget, context)
    assert fit > 4
    _decoding_engine(model, fit, context, budget, 2).step()  # holds them, and decodes a step
    with pytest.raises(MemoryError, match="cannot hold"):
        _decoding_engine(model, fit + 12, context, budget, 2)


def test_decode_graph_inputs_give_the_eager_tokens():
    """The CUDA graphs' path (static buffers padded to a bucket, rows past the batch on a scratch
    block, tables padded to the longest context) run uncaptured: the tokens of the eager engine,
    through prefill chunks (eager), decode steps of every batch size as requests finish, and
    preemption in a pool too small for all of them at once."""
    model = load("skv-tiny").model
    prompts = [list(range(3 + i, 20 + 9 * i)) for i in range(9)]
    params = [SamplingParams(max_tokens=6 + 3 * i) for i in range(9)]
    out = {}
    for mode in ("off", "eager"):
        engine = Engine(model, EngineConfig(num_blocks=24, max_seqs=8, max_batched_tokens=48, decode_graphs=mode))
        out[mode] = engine.generate(prompts, params)
        assert engine.scheduler.preemptions > 0  # blocks dropped and tables rebuilt under the same request
        if mode == "eager":
            assert set(engine.graphs.graphs) >= {1, 8}  # buckets used: the last request alone, a full batch
    assert out["eager"] == out["off"]
    with pytest.raises(ValueError, match="decode_graphs"):
        EngineConfig(decode_graphs="on")


def _micro_tokens(compute: str, kernels_mode: str, monkeypatch) -> list[list[int]]:
    cfg = MICRO.with_quant(QuantConfig(compute=compute))
    model = build(cfg, random_state(cfg, 0))
    monkeypatch.setenv("PDSERVE_KERNELS", kernels_mode)
    engine = Engine(model, EngineConfig(num_blocks=16, max_batched_tokens=64))
    return engine.generate([list(range(3, 30)), list(range(5, 12))], SamplingParams(max_tokens=4))


@pytest.mark.slow
def test_engine_on_the_triton_kernels_gives_the_reference_tokens(monkeypatch):
    """The GPU path's code (dispatch to the Triton wrappers, index tensors, prefill + decode in one
    batch) run by the interpreter on CPU tensors. fp32 compute: the interpreter's bf16 dots are
    not faithful, so bf16 compute is only checked to run end to end here."""
    if type(__import__("kernels.triton_gemm").triton_gemm._w8a8_kernel).__name__ != "InterpretedFunction":
        pytest.skip("the Triton kernels were imported compiled (TRITON_INTERPRET was not 1 first)")
    want = _micro_tokens("float32", "reference", monkeypatch)
    assert _micro_tokens("float32", "triton", monkeypatch) == want
    got = _micro_tokens("bfloat16", "triton", monkeypatch)
    assert [len(t) for t in got] == [4, 4] and all(0 <= t < MICRO.vocab_size for ts in got for t in ts)


@pytest.mark.slow
def test_device_session_dry_run_measures_every_stage(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PDSERVE_KERNELS")}
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_session", "--dry-run", "--budget-s", "1500",
                           "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_session.json").read_text())
    status = {name: r["status"] for name, r in results.items()}
    assert status == {"device": "ok", "kernel_tests": "ok", "kernels": "ok", "tiles": "ok", "engine": "ok",
                      "capacity": "ok", "distill": "skipped"}, json.dumps(results, indent=1)[-3000:]
    tiles = results["tiles"]
    assert tiles["best"] and all(r["exact"] for r in tiles["rows"]) and not tiles["stopped"]
    assert "passed" in results["kernel_tests"]["pytest_summary"]
    k = results["kernels"]
    assert k["gemm"] and all(r["int8_ms"] > 0 and r["speedup"] > 0 for r in k["gemm"]) and k["decode"]
    assert k["prologue"] and all(r["same"] and r["fused_ms"] > 0 for r in k["prologue"])
    decode = [r for r in results["engine"]["decode"] if "step_ms" in r and not r.get("graphs")
              and not r.get("value_checks")]
    assert decode and all(r["step_ms"] >= r["forward_ms"] > 0 and r["kv_read_gb"] > 0 for r in decode)
    graphs = [r for r in results["engine"]["decode"] if r.get("graphs")]
    assert len(graphs) == 3 * len(decode) and all(r["step_ms"] > 0 for r in graphs), graphs
    assert [r["prologue"] for r in graphs].count("torch") == len(decode)  # the A/Bs: each step three ways
    assert [r["tiles"] for r in graphs].count("swept") == len(decode)
    assert results["engine"]["graph_agreement"]["margins"] == []  # on CPU the graphs' path is bit-identical
    divergence = results["engine"]["graph_divergence"]
    assert divergence["first_difference"] is None, divergence
    assert len(divergence["relative_max_difference"]) == 2 * get_preset("skv-tiny").n_layers
    assert results["engine"]["prefill"][0]["tokens_per_s"] > 0
    cap = results["capacity"]["skv-tiny"]
    assert all(0 < r["ran_batch"] <= r["max_batch"] and r["step_ms"] > 0 for r in cap)
    assert cap[0]["max_batch"] >= cap[1]["max_batch"]  # longer context, fewer sequences
    table = (tmp_path / "gpu_session.txt").read_text()
    assert "capacity skv-tiny" in table and table in done.stdout


def test_top2_margin_is_the_dense_forwards_next_token_margin():
    from benchmarks.graph_vs_eager import top2_margin
    from model.quality import full_logits

    model = load("skv-tiny").model
    tokens = list(range(5, 60))
    got = top2_margin(model, tokens)
    top2 = full_logits(model, tokens)[-1].topk(2).values
    assert got["position"] == len(tokens) and got["margin"] == pytest.approx(float(top2[0] - top2[1]), abs=1e-5)
    assert got["near_tie"] == (got["margin"] < got["bound"]) and got["bound"] > 0


def test_device_session_refuses_to_run_without_a_device_unless_dry():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_session", "--out", "/nonexistent"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no CUDA device" in done.stderr and "Traceback" not in done.stderr


def test_layer_divergence_names_the_first_output_the_graphs_path_changes(monkeypatch):
    from benchmarks.gpu_engine import _pool_bytes
    from benchmarks.graph_vs_eager import layer_divergence
    from model.engine.decode_graphs import DecodeGraphs

    model = load("skv-tiny").model
    assert layer_divergence(model, _pool_bytes, batch=2, context=40)["first_difference"] is None
    forward = DecodeGraphs._forward

    def nudged(self, static):  # the static path only: layer 3's attention output moves a little
        hook = model.layers[3].self_attn.register_forward_hook(lambda _m, _a, out: out + 1e-3)
        try:
            return forward(self, static)
        finally:
            hook.remove()

    monkeypatch.setattr(DecodeGraphs, "_forward", nudged)
    got = layer_divergence(model, _pool_bytes, batch=2, context=40)
    assert got["first_difference"] == "layer 3 output", got  # the recording hook saw attention before the nudge
    assert got["relative_max_difference"]["layer 2 output"] == 0.0 < got["relative_max_difference"]["layer 3 output"]
