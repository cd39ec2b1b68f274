"""Fit the cost model to the engine on this machine (``pdserve calibrate``).

Measures, with the real prefill worker over an in-process KV store:
- prefill time over a grid of (new tokens, cached tokens): the cached part is published by a
  first request, so the second one loads it from the store the way the cluster does;
- the store-to-worker load time per byte (the "transfer" of a one-node cluster);
- decode step time over a grid of (batch, context) with the engine's continuous batching.
and fits the ``CostModel`` form by least squares. The scheduler never imports the workers: this
module is the one place that measures them, and it is only run by the CLI.
"""
from __future__ import annotations

import time

import numpy as np
from tqdm import tqdm

from scheduler.cost_model import CostModel


def calibrate(model_name: str = "skv-tiny", full: bool = False, progress: bool = True,
              quick: bool = False) -> CostModel:
    """``full``: a larger grid; ``quick``: the smallest grid that still determines the fit (tests)."""
    from model.loader import load

    loaded = load(model_name)
    model = loaded.model
    cfg = model.config
    base = _layout_fields(cfg)
    limit = min(cfg.max_seq_len, 2048 if full else 512)
    news = sorted({max(cfg.block_size, limit // d) for d in (8, 4, 2)} | {limit - cfg.block_size})
    caches = [0, limit // 4, limit // 2]
    grid = [(n, c) for n in news for c in caches if n + c <= limit]
    batches, contexts = ([1, 4, 16, 32], [limit // 4, limit // 2]) if full else ([1, 4, 12], [limit // 4])
    if quick:
        grid = [(limit // 8, 0), (limit // 2, 0), (limit // 8, limit // 2)]
        batches, contexts = [1, 4], [limit // 4]
    bar = tqdm(total=len(grid) + len(batches) * len(contexts), desc=f"calibrating {model_name}",
               disable=not progress, unit="run")
    prefill_rows, loads = _measure_prefill(model, grid, bar, repeats=3 if quick else 1)
    decode_rows = _measure_decode(model, batches, contexts, bar, steps=3 if quick else 8)
    bar.close()
    probe = CostModel("probe", 0, 0, 0, 0, 0, 0, 0, **base)
    a = np.array([[1.0, n, probe.attention_pairs(c, n)] for n, c, _ in prefill_rows])
    pre = _nonneg_lstsq(a, np.array([t for *_, t in prefill_rows]))
    d = np.array([[1.0, b, probe.kv_bytes(ctx) * b] for b, ctx, _ in decode_rows])
    dec = _nonneg_lstsq(d, np.array([t for *_, t in decode_rows]))
    bytes_moved = sum(probe.kv_bytes(c) for c, _ in loads)
    seconds = sum(t for _, t in loads)
    return CostModel(
        name=f"calibrated:{model_name}", prefill_overhead_s=pre[0], prefill_s_per_token=pre[1],
        prefill_s_per_pair=pre[2], decode_overhead_s=dec[0], decode_weights_s=0.0, decode_s_per_seq=dec[1],
        decode_s_per_kv_byte=dec[2], net_bytes_per_s=bytes_moved / seconds if seconds else 1e9,
        source=f"pdserve calibrate on this machine, {len(prefill_rows)} prefill and {len(decode_rows)} decode runs, "
               f"{time.strftime('%Y-%m-%d')}", **base)


def _layout_fields(cfg) -> dict:
    per_tok = cfg.kv_bytes_per_token_per_group
    glob = [g for g in cfg.kv_groups if g.window is None]
    local = [g for g in cfg.kv_groups if g.window is not None]
    return dict(kv_bytes_global_per_token=per_tok * len(glob), kv_bytes_local_per_token=per_tok * len(local),
                window=local[0].window if local else 0,
                local_layer_frac=sum(s.attention == "local" for s in cfg.layers) / cfg.n_layers)


def _measure_prefill(model, grid, bar, repeats: int = 1):
    """Each grid point (new tokens, cached tokens) prefilled ``repeats`` times with fresh prompts, the fastest
    kept: with as many points as the fit has unknowns (quick), one slow run could zero the per-token cost."""
    from kvstore.blocks import BlockSpec
    from kvstore.index import KVLayout
    from kvstore.keys import fingerprint_of
    from kvstore.store import KVStore
    from model.engine import SamplingParams
    from prefill.worker import PrefillWorker

    cfg, fp = model.config, fingerprint_of(model)
    store = KVStore(BlockSpec.of(cfg), fp, KVLayout.of(cfg))
    worker = PrefillWorker("calibrate", model, store, fp)
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    rng = np.random.default_rng(0)
    rows, loads = [], []
    worker.prefill("warmup", [5] * 64, params)
    for i, (new, cached) in enumerate(grid):
        runs = []
        for rep in range(repeats):
            prompt = rng.integers(10, cfg.vocab_size, new + cached).tolist()
            if cached:
                worker.prefill(f"c{i}.{rep}", prompt[:cached], params)
            h = worker.prefill(f"r{i}.{rep}", prompt, params)
            _release(store, h)
            runs.append((len(prompt) - h.cached_tokens, h.cached_tokens, h.timings["prefill"]))
            if h.cached_tokens:
                loads.append((h.cached_tokens, h.timings["load_prefix"]))
        rows.append(min(runs, key=lambda r: r[2]))
        bar.update()
    return rows, loads


def _release(store, handoff) -> None:
    if handoff.lease_id:
        store.release(handoff.lease_id)


def _measure_decode(model, batches, contexts, bar, steps: int = 8):
    from model.engine import Engine, EngineConfig, SamplingParams

    rows, rng = [], np.random.default_rng(1)
    cfg = model.config
    for ctx in contexts:
        for b in batches:
            engine = Engine(model, EngineConfig(max_seqs=max(batches), max_batched_tokens=max(512, ctx)))
            for _ in range(b):
                engine.add_request(rng.integers(10, cfg.vocab_size, ctx).tolist(),
                                   SamplingParams(max_tokens=steps + 50, ignore_eos=True))
            while any(s.computed < len(s.prompt) for s in engine.sequences.values()):  # prefill them all
                engine.step()
            for _ in range(2):  # warm-up: the first steps of a new batch shape are slow
                engine.step()
            times = []
            for _ in range(steps):
                t = time.perf_counter()
                engine.step()
                times.append(time.perf_counter() - t)
            rows.append((b, ctx, float(np.median(times))))
            bar.update()
    return rows


def _nonneg_lstsq(a: np.ndarray, y: np.ndarray) -> list[float]:
    """Least squares with every coefficient >= 0 (drop a column that comes out negative, refit)."""
    cols = list(range(a.shape[1]))
    while True:
        coef, *_ = np.linalg.lstsq(a[:, cols], y, rcond=None)
        if (coef >= 0).all() or len(cols) == 1:
            out = [0.0] * a.shape[1]
            for c, v in zip(cols, coef):
                out[c] = max(0.0, float(v))
            return out
        cols.pop(int(np.argmin(coef)))
