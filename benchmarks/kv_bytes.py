"""KV bytes per token per preset at 1k / 8k / 32k context, and the shared-KV reduction.

    python benchmarks/kv_bytes.py [--json]

Counts whole blocks the way the paged pool allocates them (local groups keep only the
blocks that the window still covers) against the analytic floor (exact token counts).
"""
from __future__ import annotations

import argparse
import json

from model.presets import PRESETS

CONTEXTS = (1024, 8192, 32768)
PAIRS = {"cai-13b-skv": "cai-13b-gqa8", "smollm2-135m-skv": "smollm2-135m"}


def floor_bytes(config, context: int) -> int:
    return sum(g.tokens_held(context) for g in config.kv_groups) * config.kv_bytes_per_token_per_group


def measure() -> dict:
    rows = []
    for name, cfg in PRESETS.items():
        for ctx in CONTEXTS:
            rows.append({
                "preset": name, "context": ctx, "kv_groups": len(cfg.kv_groups), "kv": cfg.quant.tag,
                "bytes_per_token": cfg.kv_bytes_per_token(ctx),
                "floor_bytes_per_token": floor_bytes(cfg, ctx) / ctx,
            })
    reductions = []
    for skv, base in PAIRS.items():
        for ctx in CONTEXTS:
            a, b = PRESETS[skv].kv_bytes(ctx), PRESETS[base].kv_bytes(ctx)
            reductions.append({"model": skv, "baseline": base, "context": ctx, "reduction": b / a,
                               "floor_reduction": floor_bytes(PRESETS[base], ctx) / floor_bytes(PRESETS[skv], ctx)})
    return {"rows": rows, "reductions": reductions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    out = measure()
    if parser.parse_args().json:
        print(json.dumps(out, indent=1))
        return
    print(f"{'preset':18} {'ctx':>6} {'groups':>6} {'kv':>9} {'B/token':>11} {'floor':>11}")
    for r in out["rows"]:
        print(f"{r['preset']:18} {r['context']:>6} {r['kv_groups']:>6} {r['kv']:>9} "
              f"{r['bytes_per_token']:>11.1f} {r['floor_bytes_per_token']:>11.1f}")
    print()
    for r in out["reductions"]:
        print(f"{r['model']} vs {r['baseline']} at {r['context']}: {r['reduction']:.1f}x "
              f"(floor {r['floor_reduction']:.1f}x)")


if __name__ == "__main__":
    main()
