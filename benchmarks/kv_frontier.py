"""The KV / quality frontier: the shared-KV recipe applied to SmolLM2 step by step.

    python -m benchmarks.kv_frontier [--chat-short N] [--presets a,b,...] [--json]

For each preset of ``model.presets.FRONTIER`` (served in int8, untrained unless a distillation
delta ships for it, in which case both rows appear): KV bytes per token at 1k / 8k / 32k, and
top-1 agreement / KL against SmolLM2 in float32 on both evals (``model.distill.evaluate``:
chat and general text, short and long, general text's positions past the window apart).
Then the rule for the cluster's default: of the presets whose every part reaches >= 90%
top-1, the one with the smallest KV at 8k.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from tqdm import tqdm

from model.config import QuantConfig
from model.presets import FRONTIER, get_preset

CONTEXTS = (1024, 8192, 32768)
BAR = 0.90
TEACHER = "smollm2-135m"


def students(names: list[str]) -> dict[str, torch.nn.Module]:
    """Label -> served int8 model: each preset untrained, plus with its shipped delta where one exists."""
    from model.distill.delta import shipped_delta
    from model.distill.evaluate import served_student
    from model.loader import load

    out = {}
    for name in names:
        if name == TEACHER:
            out[f"{name} (int8)"] = load(name, quant=QuantConfig()).model
            continue
        out[f"{name} (untrained)"] = served_student(name, None)
        delta = shipped_delta(name)
        if delta is not None:
            out[f"{name} (distilled)"] = served_student(name, delta)
    return out


def table(reports: dict, rows: list[dict]) -> list[str]:
    head = ("| model | KV B/tok 1k | 8k | 32k | chat short top-1 / KL | chat long | text short | "
            "text long < window | text long >= window | worst top-1 |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        rep = reports[r["label"]]
        parts = (rep.chat_short, rep.chat_long, rep.text_short, rep.text_long_in_window, rep.text_past_window)
        cells = [f"{p.top1:.1%} / {p.kl:.3f}" if p is not None else "-" for p in parts]
        kv = " | ".join(f"{r['kv'][c]:,.0f}" for c in CONTEXTS)
        lines.append(f"| {r['label']} | {kv} | {' | '.join(cells)} | {rep.worst_top1():.1%} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default=",".join(FRONTIER))
    ap.add_argument("--chat-short", type=int, default=12, help="short chat conversations (of 24)")
    ap.add_argument("--chat-long", type=int, default=2, help="long chat rows (1,280 tokens each)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from model.distill.evaluate import eval_set, evaluate_many
    from model.loader import load

    t0 = time.perf_counter()
    data = eval_set(TEACHER, args.chat_short, args.chat_long)
    teacher = load(TEACHER, quant=QuantConfig.off()).model
    models = students(args.presets.split(","))
    n_tokens = sum(len(s) for rows in vars(data).values() for s in rows)
    print(f"{len(models)} students vs {TEACHER} (float32) over {n_tokens:,} tokens per model", flush=True)
    bar = tqdm(total=1, desc="rows", unit="row")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    with torch.inference_mode():
        reports = evaluate_many(teacher, models, data, progress)
    bar.close()
    rows = []
    for label in models:
        cfg = get_preset(label.split(" ")[0])
        rows.append({"label": label, "kv": {c: cfg.kv_bytes_per_token(c) for c in CONTEXTS}})
    passing = [r for r in rows if r["label"].split(" ")[0] != TEACHER and reports[r["label"]].worst_top1() >= BAR]
    choice = min(passing, key=lambda r: r["kv"][8192])["label"] if passing else None
    if args.json:
        print(json.dumps({"rows": rows, "reports": {k: v.__dict__ for k, v in reports.items()}, "choice": choice},
                         default=lambda o: o.__dict__, indent=1))
    else:
        print("\n".join(table(reports, rows)))
    print(f"default rule (every part >= {BAR:.0%} top-1, smallest KV at 8k): "
          f"{choice or 'no shared-KV preset passes; the default stays ' + TEACHER}")
    print(f"[{time.perf_counter() - t0:.0f} s, {torch.get_num_threads()} threads]")


if __name__ == "__main__":
    main()
