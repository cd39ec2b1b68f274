"""Decode steps replayed as CUDA graphs against eager ones: greedy tokens, the logit margins where they part,
and the first layer whose output differs (``benchmarks.gpu_engine``'s engine stage runs these).

On CPU the graphs' static path is bit-identical to eager (tests/test_gpu_session.py); on an H200 in bf16 the
tokens parted beyond near ties (BENCHMARKS.md, device session 2), so the stage now also says where.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from benchmarks.gpu_session import Session


def agreement(s: Session, model, pool_bytes, batch: int = 8, context: int = 1000, steps: int = 8) -> dict:
    """Greedy tokens of the same requests (prefilled, then decoded), with decode steps replayed as graphs
    and run eagerly: the fraction that agree (on a GPU not bit for bit: a graph's tables are padded
    wider, so attention splits its sums differently)."""
    from model.engine import Engine, EngineConfig, SamplingParams

    cfg = model.config
    prompts = torch.randint(100, cfg.vocab_size, (batch, context), generator=torch.Generator().manual_seed(2)).tolist()
    mode = "auto" if s.dev.type == "cuda" else "eager"
    got = {}
    try:
        for graphs in ("off", mode):
            engine = Engine(model, EngineConfig(kv_cache_bytes=pool_bytes(cfg, batch, context + steps),
                                                max_seqs=batch, max_batched_tokens=2048, decode_graphs=graphs))
            got[graphs] = engine.generate(prompts, SamplingParams(max_tokens=steps, ignore_eos=True))
    except Exception as e:
        return {"error": repr(e)[:2000]}
    pairs = [(a, b) for x, y in zip(got["off"], got[mode]) for a, b in zip(x, y)]
    first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(got["off"], got[mode])]
    out = {"tokens": len(pairs), "agree": sum(a == b for a, b in pairs) / max(1, len(pairs)),
           "identical_sequences": sum(x == y for x, y in zip(got["off"], got[mode])), "sequences": batch,
           "first_difference": first}
    try:
        out["margins"] = [top2_margin(model, prompt + tokens[:j]) for prompt, tokens, j
                          in zip(prompts, got["off"], first) if j < len(tokens)]
        out["near_ties"] = sum(m["near_tie"] for m in out["margins"])
    except Exception as e:  # the token figures stand
        out["margins"] = {"error": repr(e)[:2000]}
    return out


def top2_margin(model, tokens: list[int]) -> dict:
    """Top-2 logit margin of the next token after ``tokens`` (one dense prefill, no paging), against the
    near-tie bound tests/greedy.py uses (1% of the largest logit): is a graph/eager difference a near tie?"""
    from model.kv_cache import ContiguousKVCache

    dev = next(model.parameters(), next(model.buffers())).device
    n = len(tokens)
    with torch.inference_mode():
        logits = model(torch.tensor(tokens, device=dev), ContiguousKVCache(model.config, n, device=dev).extend(n),
                       logits_at=torch.tensor([n - 1], device=dev))[-1].float()
    top2 = logits.topk(2).values
    margin, bound = float(top2[0] - top2[1]), 0.01 * float(logits.abs().max())
    return {"position": n, "margin": margin, "bound": bound, "near_tie": margin < bound}


def layer_divergence(model, pool_bytes, batch: int = 8, context: int = 1000) -> dict:
    """One decode step of the same prefilled requests, plain (``decode_graphs="off"``) and through the graphs'
    padded static inputs run uncaptured (``"eager"``: hooks do not fire in a replay), with every layer's
    attention and block output recorded: the first that differs, and each one's largest difference
    relative to its largest value. The prefill (one step) is the same code in both."""
    from model.engine import Engine, EngineConfig, SamplingParams

    cfg = model.config
    prompts = torch.randint(100, cfg.vocab_size, (batch, context), generator=torch.Generator().manual_seed(2)).tolist()
    probes = [(f"layer {i} {part}", m) for i, block in enumerate(model.layers)
              for part, m in (("attention", block.self_attn), ("output", block))]
    seen = {}
    try:
        for mode in ("off", "eager"):
            engine = Engine(model, EngineConfig(kv_cache_bytes=pool_bytes(cfg, batch, context + 8), max_seqs=batch,
                                                max_batched_tokens=batch * context, decode_graphs=mode))
            engine.eos_ids = set()
            for prompt in prompts:
                engine.add_request(prompt, SamplingParams(max_tokens=4, ignore_eos=True))
            engine.step()  # every prompt in one prefill step
            record = seen[mode] = {}
            hooks = [m.register_forward_hook(lambda _m, _a, out, key=key: record.__setitem__(key, out.detach().float().cpu()))
                     for key, m in probes]
            try:
                engine.step()  # one decode step of every sequence
            finally:
                for h in hooks:
                    h.remove()
    except Exception as e:  # recorded; the other figures stand
        return {"error": repr(e)[:2000]}
    rel = {}
    for key, _ in probes:
        a, b = seen["off"][key], seen["eager"][key]
        rel[key] = float((a - b).abs().max() / a.abs().max().clamp_min(1e-30)) if a.shape == b.shape else float("inf")
    first = next((key for key, _ in probes if rel[key] != 0.0), None)
    return {"batch": batch, "context": context, "first_difference": first, "relative_max_difference": rel}
