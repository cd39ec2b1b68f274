"""``pdserve chaos soak``: Poisson arrivals on a local cluster while a random worker or the store is
killed (SIGKILL, as `kill -9` would) every few seconds; every finished stream is compared with the
fault-free tokens of its prompt. (``python -m benchmarks.chaos_soak`` runs the same.) With
``--stuck-every``, a random worker's next engine step also hangs, now and then, for longer than the
stall timeout (alive, answering pings, but stuck): its requests must move and still end right.

    pdserve chaos soak [--seconds 120] [--rate 2] [--kill-every 8] [--n-prefill 1] [--n-decode 1]
                       [--max-tokens 32] [--max-prompt 96] [--seed 0] [--admission-wait 10]
                       [--stuck-every 0] [--stall-timeout 20] [--json]

Prints: sent / completed / failed with an explicit status / lost (no final answer at all: must
be 0) / completed with duplicated or missing tokens against the fault-free run (must be 0) /
p50 and p99 time to recover (from a kill until the killed part is alive again and a probe
request has been served). skv-tiny, default int8 precision (batch-invariant, so greedy tokens
must match exactly), Ray on 127.0.0.1.
"""
from __future__ import annotations

import json
import os
import platform
import random
import signal
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field



@dataclass
class Tally:
    sent: int = 0
    completed: int = 0
    failed: int = 0  # ended with an explicit error (a status a client would get)
    wrong: int = 0  # completed, but tokens duplicated, missing or different from the fault-free run
    kills: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)  # workers whose engine step was made to hang
    stuck_skipped: int = 0  # hangs not armed: the worker picked was restarting from a kill
    recover_s: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    messages: dict[str, int] = field(default_factory=dict)  # what the failed clients read, and how often
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **kw) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)


def one_request(cluster, reference, prompt: list[int], params, tally: Tally) -> None:
    from pdserve.driver import Rejected
    from pdserve.errors import client_message

    tally.add(sent=1)
    try:
        tokens = [t for out in cluster.stream(cluster.submit(prompt, params)) for t in out.token_ids]
    except Exception as e:  # noqa: BLE001 - counted by the status a client would see
        code, message = ("RESOURCE_EXHAUSTED", str(e)) if isinstance(e, Rejected) else client_message(e)
        with tally.lock:
            tally.failed += 1
            tally.failures[code] = tally.failures.get(code, 0) + 1
            tally.messages.setdefault(message, 0)
            tally.messages[message] += 1
        return
    tally.add(completed=1, wrong=int(tokens != reference(prompt)))


def killer(cluster, every_s: float, stop: threading.Event, tally: Tally, rng: random.Random, probe) -> None:
    names = [*cluster.prefill, *cluster.decode, "store"]
    while not stop.wait(every_s):
        name = rng.choice(names)
        try:
            pid = cluster.ray.get(cluster.actor(name).pid.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - still restarting from the last kill: try later
            continue
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        tally.kills.append(name)
        while time.monotonic() - t0 < 300:  # alive again (a new incarnation) and serving a probe
            state = cluster.supervisor.snapshot()[name]
            if state["state"] == "alive" and cluster.serving():
                try:
                    probe()
                    break
                except Exception:  # noqa: BLE001
                    pass
            time.sleep(0.05)
        tally.recover_s.append(time.monotonic() - t0)


def staller(cluster, every_s: float, hang_s: float, stop: threading.Event, tally: Tally, rng: random.Random) -> None:
    """Every ``every_s``, a random worker's next engine step hangs for ``hang_s`` (fault point ``*.step``)."""
    names = [*cluster.prefill, *cluster.decode]
    while not stop.wait(every_s):
        name = rng.choice(names)
        point = "prefill.step" if name in cluster.prefill else "decode.step"
        try:  # (a short wait: a worker restarting from a kill is skipped, not waited for)
            cluster.ray.get(cluster.actor(name).arm_fault.remote(point, "delay", 0, 1, hang_s), timeout=2)
        except Exception:  # noqa: BLE001
            tally.add(stuck_skipped=1)
            continue
        tally.stuck.append(name)


def add_parsers(sub) -> None:
    chaos = sub.add_parser("chaos", help="fault injection: check that a local cluster survives its parts")
    csub = chaos.add_subparsers(dest="chaos_command", required=True)
    ap = csub.add_parser("soak", help="Poisson load while a random worker or the store is killed every few "
                                      "seconds; prints sent / completed / failed / lost / wrong tokens / recovery")
    add_soak_args(ap)
    ap.set_defaults(func=soak)


def add_soak_args(ap) -> None:
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--rate", type=float, default=2.0, help="Poisson arrivals per second")
    ap.add_argument("--kill-every", type=float, default=8.0)
    ap.add_argument("--n-prefill", type=int, default=1)
    ap.add_argument("--n-decode", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-prompt", type=int, default=96,
                    help="prompts of 8 to this many tokens (past 512: prefills of several steps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--admission-wait", type=float, default=10.0, help="resilience.admission_wait_s")
    ap.add_argument("--stuck-every", type=float, default=0.0,
                    help="every so many seconds a random worker's next step hangs past the stall timeout (0: never)")
    ap.add_argument("--stall-timeout", type=float, default=20.0, help="resilience.stall_timeout_s")
    ap.add_argument("--json", action="store_true")


def soak(args) -> int:
    """Runs the soak; exit 0 only if nothing was lost and every completed stream was right."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray: bind 127.0.0.1 only
    import torch

    from model.config import QuantConfig
    from model.engine import Engine, EngineConfig, SamplingParams
    from model.loader import load
    from pdserve.cluster import LocalCluster
    from pdserve.config import Resilience

    torch.set_num_threads(1)  # the reference shares the cores with the workers: one thread runs faster
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    engine = Engine(load("skv-tiny", quant=QuantConfig()).model, EngineConfig(kv_cache_bytes=64 * 2**20, max_seqs=1))
    ref_lock, refs = threading.Lock(), {}

    def reference(prompt: list[int]) -> list[int]:
        with ref_lock:
            key = tuple(prompt)
            if key not in refs:
                refs[key] = engine.generate([prompt], params)[0]
            return refs[key]

    rng = random.Random(args.seed)
    tally, stop = Tally(), threading.Event()
    with LocalCluster("skv-tiny", quant=QuantConfig(), n_prefill=args.n_prefill, n_decode=args.n_decode,
                      resilience=Resilience(recovery_timeout_s=120.0, stall_timeout_s=args.stall_timeout,
                                            admission_wait_s=args.admission_wait)) as cluster:
        probe = lambda: cluster.generate(list(range(3, 20)), SamplingParams(max_tokens=2, ignore_eos=True))
        k = threading.Thread(target=killer, args=(cluster, args.kill_every, stop, tally, random.Random(args.seed + 1),
                                                  probe), daemon=True)
        hang = threading.Thread(target=staller, args=(cluster, args.stuck_every, args.stall_timeout + 2.0, stop, tally,
                                                      random.Random(args.seed + 2)), daemon=True)
        t0 = time.monotonic()
        k.start()
        if args.stuck_every > 0:
            hang.start()
        with ThreadPoolExecutor(max_workers=64) as pool:
            futures = []
            while time.monotonic() - t0 < args.seconds:
                vocab = cluster.model_config.vocab_size
                prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(8, args.max_prompt))]
                futures.append(pool.submit(one_request, cluster, reference, prompt, params, tally))
                time.sleep(rng.expovariate(args.rate))
            stop.set()
            for f in futures:
                f.result(timeout=600)  # every request ends: completed or an explicit failure
        k.join(timeout=300)
        if hang.is_alive():
            hang.join(timeout=30)
        counters = cluster.status()["counters"]
    lost = tally.sent - tally.completed - tally.failed
    rec = sorted(tally.recover_s)
    out = {"sent": tally.sent, "completed": tally.completed, "failed": tally.failed, "failures": tally.failures, "messages": tally.messages,
           "wrong": tally.wrong, "kills": tally.kills, "stuck_steps": tally.stuck,
           "stuck_skipped": tally.stuck_skipped, "lost": lost,
           "recover_p50_s": statistics.median(rec) if rec else None,
           "recover_p99_s": rec[min(len(rec) - 1, int(0.99 * len(rec)))] if rec else None,
           "counters": counters, "args": {k: v for k, v in vars(args).items() if k != "func"},
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print_report(args, out, tally)
    return 0 if lost == 0 and tally.wrong == 0 else 1


def print_report(args, out: dict, tally: Tally) -> None:
    print(f"soak {args.seconds:g}s, Poisson {args.rate:g}/s, a kill every {args.kill_every:g}s, "
          f"{args.n_prefill} prefill + {args.n_decode} decode, skv-tiny int8, {args.max_tokens} tokens each")
    print(f"sent {tally.sent}  completed {tally.completed}  failed (explicit status) {tally.failed} {tally.failures}  "
          f"lost {out['lost']}  duplicated/missing/wrong tokens {tally.wrong}")
    print(f"kills {len(tally.kills)} ({', '.join(tally.kills)}); time to recover p50 {out['recover_p50_s'] or 0:.1f}s "
          f"p99 {out['recover_p99_s'] or 0:.1f}s")
    if args.stuck_every > 0:
        print(f"stuck steps {len(tally.stuck)} ({', '.join(tally.stuck)}), each {args.stall_timeout + 2:g}s "
              f"against a stall timeout of {args.stall_timeout:g}s; {tally.stuck_skipped} not armed (worker restarting)")
    for message, n in tally.messages.items():
        print(f"  {n} x {message}")
    print(f"cluster counters: {out['counters']}")
