"""The ``pdserve`` command line."""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import time


# Subcommands that live beside their feature: each module has ``add_parsers(subparsers)``.
SUBCOMMAND_MODULES: tuple[str, ...] = ("pdserve.sim_cli", "pdserve.distill_cli", "pdserve.server_cli", "pdserve.chaos")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="stream a completion of a prompt to stdout")
    g.add_argument("prompt")
    g.add_argument("--model", default=None, help="preset name or weight path (default: the cluster's default preset)")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    g.add_argument("--precision", choices=["int8", "float32", "bfloat16"], default="int8")
    g.add_argument("--cluster", action="store_true",
                   help="run through a local Ray cluster on 127.0.0.1: prefill worker -> KV store -> decode worker")
    g.add_argument("--server", nargs="?", const="", default=None, metavar="HOST:PORT",
                   help="send the prompt over gRPC to a running server (`pdserve up`; no value = the one in "
                        "the state file)")
    g.add_argument("--state-file", default=None, help="the server's state file (default ~/.pdserve/server.json)")
    g.add_argument("--ca-file", default="", help="PEM of the CA, for a TLS server (token: PDSERVE_TOKEN)")
    g.set_defaults(func=_generate)

    c = sub.add_parser("compare", help="teacher-forced agreement of a student model with a teacher")
    c.add_argument("--teacher", default="smollm2-135m")
    c.add_argument("--student", default="smollm2-135m-skv")
    c.add_argument("--teacher-precision", choices=["int8", "float32", "bfloat16"], default="float32")
    c.add_argument("--student-precision", choices=["int8", "float32", "bfloat16"], default="int8")
    c.add_argument("--no-general", dest="general", action="store_false",
                   help="skip the general-text eval (stdlib code and docs, license texts; ~12k token passes)")
    c.set_defaults(func=_compare)

    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).add_parsers(sub)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"pdserve: error: {e}", file=sys.stderr)
        return 2


def _quant(precision: str):
    from model.config import QuantConfig

    return QuantConfig() if precision == "int8" else QuantConfig.off(precision)


def _generate(args) -> int:
    if args.server is not None:
        return _generate_over_grpc(args)
    from model.engine import Engine, SamplingParams
    from model.loader import load
    from model.presets import DEFAULT_PRESET

    name = args.model or DEFAULT_PRESET
    # Bad arguments are refused before the model loads (seconds to minutes), not after.
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))
    if args.cluster and not _quant(args.precision).kv:
        raise ValueError(f"the cluster ships int8 KV between workers: use --precision int8 (got {args.precision}); "
                         "float runs need the single-process engine (leave out --cluster)")
    t0 = time.perf_counter()
    loaded = load(name, quant=_quant(args.precision))
    tok = loaded.tokenizer
    if tok is None:
        raise ValueError(f"model {name!r} has no tokenizer; give a model with one (a preset or a GGUF file)")
    endoftext = tok.token_id("<|endoftext|>")
    if endoftext is not None:
        sampling = dataclasses.replace(sampling, stop_token_ids=(endoftext,))
    prompt = tok.encode_chat([{"role": "user", "content": args.prompt}]) if args.chat else tok.encode(args.prompt)
    if args.cluster:
        return _generate_on_cluster(name, args, tok, prompt, sampling)
    engine = Engine(loaded.model, tokenizer=tok)
    engine.add_request(prompt, sampling)
    print(f"[{name}, {loaded.model.config.quant.tag}, loaded in {time.perf_counter() - t0:.1f}s, "
          f"{len(prompt)} prompt tokens]", file=sys.stderr)
    t1, first, n, reason = time.perf_counter(), None, 0, None
    for out in engine.stream():
        first = first or time.perf_counter()
        n += len(out.token_ids)
        sys.stdout.write(out.text)
        sys.stdout.flush()
        reason = out.finish_reason or reason
    end = time.perf_counter()
    decode = (n - 1) / (end - first) if n > 1 and end > first else 0.0
    print(f"\n[{n} tokens, finish: {reason}, time to first token {first - t1:.2f}s, "
          f"decode {decode:.1f} tok/s]", file=sys.stderr)
    return 0


def _generate_on_cluster(name: str, args, tok, prompt: list[int], sampling) -> int:
    from pdserve.cluster import LocalCluster

    sampling = dataclasses.replace(sampling, stop_token_ids=sampling.stop_token_ids + (tok.eos_token_id,), stop=())
    t0 = time.perf_counter()
    with LocalCluster(name, quant=_quant(args.precision)) as cluster:
        print(f"[cluster up in {time.perf_counter() - t0:.1f}s: 1 prefill + 1 decode worker, "
              f"{len(prompt)} prompt tokens]", file=sys.stderr)
        t1, first, ids, shown, reason = time.perf_counter(), None, [], 0, None
        for out in cluster.stream(cluster.submit(prompt, sampling)):
            first = first or time.perf_counter()
            ids.extend(out.token_ids)
            text = tok.decode(ids)
            if not text.endswith("\ufffd"):
                sys.stdout.write(text[shown:])
                sys.stdout.flush()
                shown = len(text)
            reason = out.finish_reason or reason
        end = time.perf_counter()
    print(f"\n[{len(ids)} tokens, finish: {reason}, time to first token {first - t1:.2f}s, "
          f"{(len(ids) - 1) / (end - first) if len(ids) > 1 and end > first else 0:.1f} tok/s after it]",
          file=sys.stderr)
    return 0


def _generate_over_grpc(args) -> int:
    """The gRPC client path: the server owns the model, the template and the cluster."""
    import grpc

    from pdserve.server_cli import connect

    client = connect(args.server, args.state_file, args.ca_file)
    target = client.target
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_k": args.top_k,
                "top_p": args.top_p, "stop": args.stop, **({"seed": args.seed} if args.seed is not None else {})}
    call = (client.chat([{"role": "user", "content": args.prompt}], **sampling) if args.chat
            else client.generate(args.prompt, **sampling))
    try:
        for r in call:
            sys.stdout.write(r.text)
            sys.stdout.flush()
            if r.finished:
                u, t = r.usage, r.timings
                print(f"\n[{target}: {u.completion_tokens} tokens, finish: {r.finish_reason}, {u.prompt_tokens} prompt "
                      f"({u.cached_tokens} cached), time to first token {t.ttft_s:.2f}s, mean tbt "
                      f"{t.mean_tbt_s * 1e3:.0f} ms]", file=sys.stderr)
    except grpc.RpcError as e:
        print(f"\npdserve: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2 if e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND) else 1
    return 0


def _compare(args) -> int:
    from model.config import DEFAULT_WINDOW
    from model.general_text import passages
    from model.loader import load
    from model.quality import compare, compare_split
    from model.texts import EVAL

    teacher = load(args.teacher, quant=_quant(args.teacher_precision))
    student = load(args.student, quant=_quant(args.student_precision))
    if teacher.tokenizer is None:
        raise ValueError(f"teacher {args.teacher!r} has no tokenizer to encode the prompt set")
    print(f"{args.student} ({args.student_precision}) vs {args.teacher} ({args.teacher_precision}):")
    seqs = [teacher.tokenizer.encode(t) for t in EVAL]
    print(f"  fixed prompt set: {compare(teacher.model, student.model, seqs)}", flush=True)
    if args.general:  # text no one here wrote (model.general_text), short rows and long ones
        short, long = passages(teacher.tokenizer.encode)
        print(f"  general text, short: {compare(teacher.model, student.model, [p.tokens for p in short])}",
              flush=True)
        inside, past = compare_split(teacher.model, student.model, [p.tokens for p in long], DEFAULT_WINDOW)
        print(f"  general text, long, positions < {DEFAULT_WINDOW}: {inside}")
        print(f"  general text, long, positions >= {DEFAULT_WINDOW}: {past}")
    for ctx in (1024, 8192):
        print(f"  KV bytes/token at {ctx}: teacher {teacher.model.config.kv_bytes_per_token(ctx):.0f}, "
              f"student {student.model.config.kv_bytes_per_token(ctx):.0f}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
