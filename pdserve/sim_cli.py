"""``pdserve sim`` (trace replay through the scheduler's policies) and ``pdserve calibrate``
(fit the cost model to the engine on this machine)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

DEFAULT_CALIBRATION = Path("~/.cache/pdserve/cost_model.json")
TABLE_COLUMNS = (("policy", "{}"), ("completed", "{}"), ("rejected", "{}"), ("ttft_mean", "{:.2f}"),
                 ("ttft_p99", "{:.2f}"), ("tbt_p99", "{:.3f}"), ("slo_attainment", "{:.3f}"),
                 ("goodput_rps", "{:.3f}"), ("cache_hit_ratio", "{:.3f}"), ("decision_us_mean", "{:.0f}"))


def add_parsers(sub) -> None:
    s = sub.add_parser("sim", help="replay a request trace through simulated prefill/decode instances")
    s.add_argument("--trace", required=True, help="Mooncake JSONL (hash_ids) or token-level JSONL (tokens)")
    s.add_argument("--policy", default="goodput", help="a policy name, or several comma-separated")
    s.add_argument("--prefill", type=int, default=8, help="prefill instances")
    s.add_argument("--decode", type=int, default=8, help="decode instances")
    s.add_argument("--cost-model", default="llama3-70b-a800",
                   help="llama3-70b-a800, cai-13b-skv-h100, or a JSON file from `pdserve calibrate`")
    s.add_argument("--ttft-slo", type=float, default=30.0, help="seconds")
    s.add_argument("--tbt-slo", type=float, default=100.0, help="milliseconds")
    s.add_argument("--speed", type=float, default=1.0, help="arrival-rate scaling (2 = twice as fast)")
    s.add_argument("--cache-tokens", type=int, default=2_000_000, help="per prefill instance; 0 = unbounded")
    s.add_argument("--block-size", type=int, default=64, help="tokens per block for token-level traces")
    s.add_argument("--colocated", action="store_true", help="baseline: prefill+decode on the same instances")
    s.add_argument("--limit", type=int, default=0, help="replay only the first N requests")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", default=None, help="write the results (a list, one per run) here")
    s.add_argument("--sweep", action="store_true", help="every policy given x --speeds; draw curves with --plot")
    s.add_argument("--speeds", default="0.5,1,1.5,2,3,4", help="arrival-rate scalings for --sweep")
    s.add_argument("--plot", default=None, help="directory for goodput and TTFT PNGs (--sweep)")
    s.set_defaults(func=_sim)

    c = sub.add_parser("calibrate", help="measure prefill and decode on this machine; write the cost-model fit")
    c.add_argument("--model", default="skv-tiny", help="preset to measure")
    c.add_argument("--out", default=str(DEFAULT_CALIBRATION))
    c.add_argument("--full", action="store_true", help="a larger grid (slower, better fit)")
    c.set_defaults(func=_calibrate)


def _sim(args) -> int:
    from scheduler.cost_model import load_cost_model
    from scheduler.policies import SLO, policy_names
    from scheduler.sim_run import load_requests, simulate
    from scheduler.simulator import SimConfig

    policies = [p.strip() for p in args.policy.split(",") if p.strip()]
    for p in policies:
        if p not in policy_names():
            raise ValueError(f"--policy: unknown policy {p!r}; valid policies: {', '.join(policy_names())}")
    if args.ttft_slo <= 0 or args.tbt_slo <= 0:
        raise ValueError(f"--ttft-slo and --tbt-slo must be positive, got {args.ttft_slo}, {args.tbt_slo}")
    cost = load_cost_model(args.cost_model)
    requests, bs = load_requests(args.trace, args.block_size)
    if args.limit:
        requests = requests[: args.limit]
    slo = SLO(args.ttft_slo, args.tbt_slo / 1e3)
    try:
        speeds = [float(x) for x in args.speeds.split(",")] if args.sweep else [args.speed]
    except ValueError:
        raise ValueError(f"--speeds: expected comma-separated numbers, got {args.speeds!r}") from None
    results = []
    for speed in speeds:
        cfg = SimConfig(args.prefill, args.decode, bs, args.cache_tokens or None, speed, args.colocated)
        for p in policies:
            results.append(simulate(requests, p, cost, cfg, slo, args.seed))
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.plot:
        for path in plot_sweep(results, args.plot):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def print_table(results: list[dict]) -> None:
    head = ["speed"] + [c for c, _ in TABLE_COLUMNS]
    rows = [[f"{r['speed']:g}"] + [f.format(r[c]) for c, f in TABLE_COLUMNS] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    for row in rows:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def plot_sweep(results: list[dict], out_dir: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric, label in (("goodput_rps", "goodput (req/s meeting both SLOs)"), ("ttft_mean", "mean TTFT (s)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for policy in dict.fromkeys(r["policy"] for r in results):
            pts = sorted((r["speed"], r[metric]) for r in results if r["policy"] == policy)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=policy)
        ax.set_xlabel("arrival-rate scaling (x trace speed)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / f"{metric}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def _calibrate(args) -> int:
    from scheduler.calibrate import calibrate

    out = Path(args.out).expanduser()
    model = calibrate(args.model, full=args.full)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(model.to_json())
    print(f"wrote {out}: prefill {model.prefill_overhead_s * 1e3:.1f} ms + {model.prefill_s_per_token * 1e6:.1f} "
          f"us/token; decode step {model.decode_overhead_s * 1e3:.1f} ms + {model.decode_s_per_seq * 1e3:.2f} ms/seq")
    return 0
