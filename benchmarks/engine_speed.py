"""Prefill and decode speed of the engine on SmolLM2, against transformers and llama.cpp, one run.

    python -m benchmarks.engine_speed [--runs 3] [--skip-peers] [--json]

Workloads (../shared/anchors.md): (b) one 512-token prompt, 128 greedy tokens; (a) 32 such
prompts submitted together. Prompts are random in-vocabulary tokens; EOS is ignored so every
run generates exactly 128 tokens. Figures are medians over --runs; start-up is excluded.
transformers runs fp32 (its CPU default); llama.cpp runs the same Q4_1 GGUF with 2 threads.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.common import machine, median_time, random_prompts
from model.engine import Engine, EngineConfig, SamplingParams

PROMPT, OUTPUT = 512, 128


def ours(model, prompts: list[list[int]]) -> dict:
    """Wall time, prefill time (until every first token) and decode time of one batch."""
    engine = Engine(model, EngineConfig(max_batched_tokens=2048, max_seqs=64, kv_cache_bytes=2 * 2**30))
    engine.eos_ids = set()
    params = SamplingParams(max_tokens=OUTPUT)
    t0 = time.perf_counter()
    for p in prompts:
        engine.add_request(p, params)
    firsts, t_prefilled = set(), None
    while engine.has_work():
        for out in engine.step():
            firsts.add(out.request_id)
        if t_prefilled is None and len(firsts) == len(prompts):
            t_prefilled = time.perf_counter()
    t1 = time.perf_counter()
    return {"wall": t1 - t0, "prefill": t_prefilled - t0, "decode": t1 - t_prefilled}


def transformers_b(prompt: list[int], runs: int) -> dict:
    import transformers

    from model.weights import smollm2_gguf_path

    path = smollm2_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    ids = torch.tensor([prompt])

    def prefill():
        with torch.no_grad():
            model(ids)

    def whole():
        with torch.no_grad():
            model.generate(ids, max_new_tokens=OUTPUT, min_new_tokens=OUTPUT, do_sample=False, pad_token_id=0)

    prefill()
    t_prefill, _ = median_time(prefill, runs)
    t_wall, _ = median_time(whole, runs)
    return {"wall": t_wall, "prefill": t_prefill, "decode": t_wall - t_prefill}


def llama_cpp_b(prompt: list[int], runs: int) -> dict | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    from model.weights import smollm2_gguf_path

    llm = llama_cpp.Llama(str(smollm2_gguf_path()), n_ctx=1024, n_threads=torch.get_num_threads(),
                          n_batch=512, verbose=False)

    import numpy as np

    def last_argmax() -> int:  # logits of the last evaluated token, read from the context
        return int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).argmax())

    def run() -> dict:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = last_argmax()
        t1 = time.perf_counter()
        for _ in range(OUTPUT - 1):
            llm.eval([tok])
            tok = last_argmax()
        t2 = time.perf_counter()
        return {"wall": t2 - t0, "prefill": t1 - t0, "decode": t2 - t1}

    run()
    results = [run() for _ in range(runs)]
    return {k: sorted(r[k] for r in results)[len(results) // 2] for k in results[0]}


def rates(r: dict, batch: int) -> dict:
    return {**r, "prefill_tok_s": batch * PROMPT / r["prefill"], "decode_tok_s": batch * (OUTPUT - 1) / r["decode"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from model.loader import load

    model = load("smollm2-135m").model
    b = random_prompts(1, PROMPT, seed=1)
    a = random_prompts(32, PROMPT, seed=2)
    ours(model, b)  # warm up
    res = {"machine": machine()}

    def med(fn, runs):
        results = [fn() for _ in range(runs)]
        return {k: sorted(r[k] for r in results)[len(results) // 2] for k in results[0]}

    res["pdserve int8 (b)"] = rates(med(lambda: ours(model, b), args.runs), 1)
    res["pdserve int8 (a)"] = rates(med(lambda: ours(model, a), max(1, args.runs // 2)), 32)
    if not args.skip_peers:
        res["transformers fp32 (b)"] = rates(transformers_b(b[0], args.runs), 1)
        lc = llama_cpp_b(b[0], args.runs)
        if lc is not None:
            res["llama.cpp Q4_1 (b)"] = rates(lc, 1)
    if args.json:
        print(json.dumps(res, indent=1))
        return
    print(res.pop("machine"))
    print(f"{'engine':24} {'wall s':>8} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for name, r in res.items():
        print(f"{name:24} {r['wall']:8.2f} {r['prefill_tok_s']:14.0f} {r['decode_tok_s']:13.1f}")
    base = res.get("transformers fp32 (b)")
    lc = res.get("llama.cpp Q4_1 (b)")
    ob, oa = res["pdserve int8 (b)"], res["pdserve int8 (a)"]
    if base:
        print(f"batch-1 decode vs transformers: {ob['decode_tok_s'] / base['decode_tok_s']:.2f}x (goal >= 2x)")
    if lc:
        print(f"batch-32 aggregate decode vs llama.cpp single stream: {oa['decode_tok_s'] / lc['decode_tok_s']:.2f}x "
              f"(goal >= 2x); batch-1 decode vs llama.cpp: {ob['decode_tok_s'] / lc['decode_tok_s']:.2f}x")


if __name__ == "__main__":
    main()
