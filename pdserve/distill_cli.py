"""``pdserve distill``: train the shared-KV student against its teacher, or evaluate a delta.

Training writes resumable checkpoints and, at the end, ``<out>/delta.safetensors``; copying
that file to ``model/deltas/<student>.safetensors`` makes ``load(<student>)`` apply it.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path


def add_parsers(sub) -> None:
    d = sub.add_parser("distill", help="int8-aware distillation of a shared-KV student (issue 9)")
    d.add_argument("--teacher", default="smollm2-135m")
    d.add_argument("--student", default="smollm2-135m-skv")
    d.add_argument("--steps", type=int, default=200)
    d.add_argument("--batch", type=int, default=4)
    d.add_argument("--seq-len", type=int, default=256)
    d.add_argument("--lr", type=float, default=5e-4)
    d.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="cosine: decay to a tenth of --lr by the last step (over --steps, resumed runs included)")
    d.add_argument("--train-prompts", type=int, default=160, help="train prompts per sampled set (at most 320)")
    d.add_argument("--train-sets", type=int, default=1,
                   help="independently sampled completions of the train prompts: more teacher text; 0: no chat "
                        "rows and no teacher sampling (plain text only, needs --plain-tokens)")
    d.add_argument("--plain-tokens", type=int, default=0,
                   help="also train on this many tokens of plain text (package sources the teacher only reads; "
                        "never the stdlib or /usr/share, which the eval reads), in rows of --seq-len tokens")
    d.add_argument("--in-window-weight", type=float, default=1.0,
                   help="kl objective: loss weight of positions inside the student's local window relative to "
                        "those past it (1: plain mean; 0: only positions past the window, which needs rows "
                        "longer than the window, e.g. --seq-len 1536 for a 1024 window)")
    d.add_argument("--widen-rank", type=int, default=0,
                   help="> 0: also train the norms, and o_proj and the MLP through adapters of this rank")
    d.add_argument("--objective", choices=["layerwise", "kl"], default="layerwise",
                   help="layerwise: match each attention block given the teacher's inputs (cheap); kl: end to end")
    d.add_argument("--eval-every", type=int, default=25)
    d.add_argument("--out", default=None, help="run directory (default ~/.cache/pdserve/distill/run)")
    d.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    d.add_argument("--init-delta", default=None, help="start from this delta (e.g. a layerwise run's result)")
    d.add_argument("--export", action="store_true", help="write <out>/delta.safetensors from the checkpoint, no training")
    d.add_argument("--eval-only", action="store_true", help="evaluate --delta (default: the committed one)")
    d.add_argument("--delta", default=None, help="delta file to evaluate; 'none' = the untrained conversion")
    d.add_argument("--eval-short", type=int, default=None, help="evaluate only the first N short conversations")
    d.add_argument("--device", default="cuda" if _cuda() else "cpu")
    d.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is best on a busy machine)")
    d.set_defaults(func=_distill)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _distill(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.eval_only:
        return _eval(args)
    if args.export:
        return _export(args)
    return _train(args)


def _eval(args) -> int:
    from model.distill.delta import shipped_delta
    from model.distill.evaluate import evaluate

    delta = None if args.delta == "none" else (args.delta or shipped_delta(args.student))
    t0 = time.perf_counter()
    report = evaluate(args.teacher, args.student, delta, n_short=args.eval_short)
    print(f"{args.student} (int8 serving path, delta: {delta or 'none'}) vs {args.teacher} (float32):")
    for line in report.lines():
        print("  " + line)
    print(f"  [eval took {time.perf_counter() - t0:.0f}s]")
    return 0


def _export(args) -> int:
    from model.distill.data import CACHE_DIR
    from model.distill.train import checkpoint_weights

    out = Path(args.out or CACHE_DIR / "run")
    state, weights = checkpoint_weights(out)
    _write_delta(out, args.student, weights, f"{state['config']['objective']} {state['step']} steps, "
                                             f"{state['seconds']:.0f}s")
    return 0


def _write_delta(out: Path, student: str, weights: dict, notes: str) -> Path:
    from model.distill.delta import save_delta
    from model.distill.train import preset_state

    config, base = preset_state(student)  # the published conversion: what the delta replaces
    path = out / "delta.safetensors"
    info = save_delta(path, config, base, weights, notes=notes)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {len(info.tensors)} tensors, "
          f"{sum(w.numel() for w in weights.values()):,} trained parameters; {notes})")
    return path


def _train(args) -> int:
    from tqdm import tqdm

    from model.distill.data import CACHE_DIR
    from model.distill.delta import read_delta
    from model.distill.train import Setup, TrainConfig, Trainer, seed_from_delta

    cfg = TrainConfig(teacher=args.teacher, student=args.student, steps=args.steps, batch=args.batch,
                      seq_len=args.seq_len, lr=args.lr, objective=args.objective,
                      lr_schedule=args.lr_schedule, train_prompts=args.train_prompts, train_sets=args.train_sets,
                      plain_tokens=args.plain_tokens, in_window_weight=args.in_window_weight,
                      widen_rank=args.widen_rank, eval_every=args.eval_every,
                      device=args.device, out=args.out or str(CACHE_DIR / "run"))
    setup = Setup.from_presets(cfg)
    factors = {}
    if args.init_delta:
        _, weights = read_delta(args.init_delta)
        try:
            factors = seed_from_delta(setup, weights, cfg.widen_rank)
        except ValueError as e:
            raise SystemExit(f"--init-delta {args.init_delta}: {e}") from None
    bar = tqdm(total=cfg.steps, file=sys.stderr, unit="step")

    def progress(tr: Trainer, loss: float) -> None:
        last = tr.curve.points[-1] if tr.curve.points else {}
        bar.n = tr.step
        bar.set_postfix(step_s=f"{tr.seconds / max(tr.step, 1):.2f}", loss=f"{loss:.4f}",
                        top1=f"{last.get('short_top1', float('nan')):.1%}",
                        long=f"{last.get('long_top1', float('nan')):.1%}",
                        past=f"{last.get('past_top1', float('nan')):.1%}")
    trainer = Trainer(cfg, setup, progress)
    trainer.seed_adapters(factors)
    if args.resume and trainer.resume():
        print(f"resumed {cfg.out} at step {trainer.step}", file=sys.stderr)
    trainer.run()
    bar.close()
    _write_delta(Path(cfg.out), cfg.student, trainer.student.trained_state(),
                 f"{cfg.objective} {trainer.step} steps, {trainer.seconds:.0f}s")
    for p in trainer.curve.points:
        print(p)
    return 0
