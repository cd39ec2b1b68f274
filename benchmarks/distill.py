"""Distillation figures for BENCHMARKS.md: the training curve, the delta, the eval, KV bytes per token.

    python -m benchmarks.distill [--run ~/.cache/pdserve/distill/run] [--delta PATH] [--skip-eval]

The curve comes from a run's ``state.json`` (fake-quant eval slice, recorded during
training); the final figures re-run the fixed eval on the int8 serving path.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from model.distill.data import CACHE_DIR


def curve_table(run: Path) -> list[str]:
    state = json.loads((run / "state.json").read_text())
    lines = ["| step | train s | objective | loss | short top-1 | short KL | long top-1 | long KL |",
             "|---:|---:|---|---:|---:|---:|---:|---:|"]
    for p in state["curve"]:
        lines.append(f"| {p['step']} | {p['seconds']:.0f} | {p['objective']} | {p['loss']:.4f} | "
                     f"{p['short_top1']:.1%} | {p['short_kl']:.3f} | {p['long_top1']:.1%} | {p['long_kl']:.3f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", action="append", default=[], help="run directory (repeatable: stages in order)")
    ap.add_argument("--delta", default=None)
    ap.add_argument("--skip-eval", action="store_true")
    args = ap.parse_args()
    from model.distill.delta import read_delta, shipped_delta
    from model.presets import get_preset

    print(f"machine: {platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}")
    for run in args.run or [str(CACHE_DIR / "run")]:
        if (Path(run) / "state.json").is_file():
            print(f"\ncurve of {run}:")
            print("\n".join(curve_table(Path(run))))
    delta = Path(args.delta) if args.delta else shipped_delta("smollm2-135m-skv")
    if delta is not None:
        info, weights = read_delta(delta)
        n = sum(w.numel() for w in weights.values())
        print(f"\ndelta {delta}: {delta.stat().st_size / 2**20:.1f} MiB, {len(weights)} tensors, "
              f"{n:,} trained parameters; {info.notes}")
    for name in ("smollm2-135m", "smollm2-135m-skv"):
        c = get_preset(name)
        print(f"KV bytes/token {name} ({c.quant.tag}): " +
              ", ".join(f"{ctx // 1024}k {c.kv_bytes_per_token(ctx):.0f}" for ctx in (1024, 8192, 32768)))
    if not args.skip_eval:
        from model.distill.evaluate import evaluate

        for d in (None, delta):
            report = evaluate("smollm2-135m", "smollm2-135m-skv", d)
            print(f"\neval, delta {d}:\n  " + "\n  ".join(report.lines()))


if __name__ == "__main__":
    main()
