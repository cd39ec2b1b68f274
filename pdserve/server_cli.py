"""``pdserve up | down | status | chat | bench``: run a server and talk to it over gRPC.

``up`` starts one server process (a LocalCluster plus the gateway) in the background, in its own
session, and records its PID, address and log in a state file; ``down`` stops that PID (and
nothing else) and checks that no process of its session is left.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from pdserve.server import DEFAULT_STATE, ServerState


def add_parsers(sub) -> None:
    up = sub.add_parser("up", help="start a pdserve server (local Ray on 127.0.0.1, or --address to join one)")
    up.add_argument("--config", default=None, help="topology config, TOML or JSON (see pdserve/config.py)")
    up.add_argument("--model", default=None, help="override cluster.model")
    up.add_argument("--port", type=int, default=None, help="override server.port (0 = a free port)")
    up.add_argument("--http-port", type=int, default=None,
                    help="override server.http_port: the OpenAI HTTP API and dashboard (0 = a free port, -1 = off)")
    up.add_argument("--address", default=None, help="join the Ray cluster at this address (ray start --head ...)")
    up.add_argument("--foreground", action="store_true", help="run in this process until Ctrl-C / SIGTERM")
    up.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the server to be SERVING")
    up.add_argument("--log-file", default="", help=argparse.SUPPRESS)  # where `up` sends a --foreground child's output
    _state_arg(up)
    up.set_defaults(func=_up)

    down = sub.add_parser("down", help="stop the server that `pdserve up` started")
    _state_arg(down)
    down.set_defaults(func=_down)

    st = sub.add_parser("status", help="the running server's workers, cache tiers and hit ratios")
    _client_args(st)
    st.set_defaults(func=_status)

    chat = sub.add_parser("chat", help="a streaming multi-turn chat over gRPC")
    _client_args(chat)
    chat.add_argument("--message", "-m", action="append", default=[], help="a user turn (repeat for more turns); "
                                                                             "none = interactive")
    chat.add_argument("--system", default=None, help="a system message first")
    chat.add_argument("--max-tokens", type=int, default=128)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--embedded", action="store_true", help="start a server for this chat (up + chat + down)")
    chat.add_argument("--model", default=None, help="with --embedded: the model to serve")
    chat.set_defaults(func=_chat)

    b = sub.add_parser("bench", help="a load generator over gRPC or HTTP (Poisson or trace arrivals), vLLM-style report")
    _client_args(b)
    b.add_argument("--backend", choices=("grpc", "openai"), default="grpc",
                   help="grpc (pdserve.v1) or openai (POST /v1/completions, streamed)")
    b.add_argument("--base-url", default=None, help="with --backend openai: http(s)://host:port (default: the "
                                                    "state file's server)")
    b.add_argument("--num-prompts", type=int, default=100)
    b.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s, Poisson (inf = all at once)")
    b.add_argument("--max-concurrency", type=int, default=32)
    b.add_argument("--input-len", type=int, default=64, help="random prompt length in tokens")
    b.add_argument("--max-tokens", type=int, default=16)
    b.add_argument("--trace", default=None, help="Mooncake trace (jsonl): timestamps and shared prefixes")
    b.add_argument("--trace-tokens-per-block", type=int, default=16, help="tokens per trace hash id (512 in the trace)")
    b.add_argument("--time-scale", type=float, default=1.0, help="multiply trace timestamps by this")
    b.add_argument("--ttft-slo-ms", type=float, default=2000.0)
    b.add_argument("--tpot-slo-ms", type=float, default=200.0)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--request-timeout", type=float, default=300.0)
    b.set_defaults(func=_bench)


def _state_arg(p) -> None:
    p.add_argument("--state-file", type=Path, default=DEFAULT_STATE, help=f"default {DEFAULT_STATE}")


def _client_args(p) -> None:
    _state_arg(p)
    p.add_argument("--server", default=None, help="host:port (default: the server in the state file)")
    p.add_argument("--ca-file", default="", help="PEM of the CA, for a TLS server")


def _client(args):
    return connect(args.server, args.state_file, args.ca_file)


def connect(server: str | None, state_file: Path | None, ca_file: str = ""):
    """A client of ``server`` (HOST:PORT), or of the server recorded in the state file when it is
    empty; the bearer token comes from PDSERVE_TOKEN."""
    from pdserve.client import Client

    target = server
    if not target:
        state_file = state_file or DEFAULT_STATE
        state = ServerState.load(state_file)
        if state is None:
            raise ValueError(f"no running server in {state_file}: start one with `pdserve up`, "
                             "or give --server HOST:PORT")
        target = state.target
    return Client(target, os.environ.get("PDSERVE_TOKEN", ""), ca_file)


# -- up / down -----------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _up(args) -> int:
    from pdserve.config import load_config

    cfg = load_config(args.config)  # config errors surface here, before any process starts
    if args.model:
        cfg.cluster.model = args.model
    if args.port is not None:
        cfg.server.port = args.port
    if getattr(args, "http_port", None) is not None:
        cfg.server.http_port = args.http_port
    from pdserve.gateway import check_exposure
    from pdserve.server import server_options

    check_exposure(server_options(cfg))  # refuse an exposed bind before starting anything
    old = ServerState.load(args.state_file)
    if old is not None and _alive(old.pid):
        raise ValueError(f"a server is already running (pid {old.pid}, {old.target}); `pdserve down` first")
    if args.foreground:
        import asyncio

        from pdserve.server import serve

        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        asyncio.run(serve(cfg, args.address, args.state_file, log=args.log_file))
        return 0
    state = start_background(args, args.state_file, args.timeout)
    print(f"pdserve: up: pid {state.pid}, gRPC {state.target}, metrics http://127.0.0.1:{state.metrics_port}/metrics, "
          f"model {state.model}, log {state.log}")
    if state.http_port >= 0:
        print(f"pdserve: up: OpenAI API {http_base(state)}/v1, dashboard {http_base(state)}/")
    return 0


def http_base(state: ServerState) -> str:
    """The HTTP edge's base URL, on the host of the gRPC target."""
    return f"{'https' if state.tls else 'http'}://{state.target.rsplit(':', 1)[0]}:{state.http_port}"


def start_background(args, state_file: Path, timeout_s: float) -> ServerState:
    """Starts ``pdserve up --foreground`` in a new session; waits until it is SERVING."""
    from pdserve.client import wait_serving

    state_file = Path(state_file).expanduser()
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.unlink(missing_ok=True)
    log = state_file.with_suffix(".log")
    cmd = [sys.executable, "-m", "pdserve.cli", "up", "--foreground", "--state-file", str(state_file),
           "--log-file", str(log)]
    for flag in ("config", "model", "port", "http_port", "address"):
        if getattr(args, flag, None) is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        state = ServerState.load(state_file)
        if state is not None and state.pid == proc.pid:
            # The state file is written once the server is SERVING; a plaintext health check confirms it
            # (a TLS server's certificate is the client's business: its state file is enough).
            if state.tls or wait_serving(state.target, deadline - time.monotonic(), lambda: proc.poll() is None):
                return state
        time.sleep(0.3)
    if proc.poll() is None:
        stop_pid(proc.pid)
    tail = log.read_text()[-3000:] if log.exists() else ""
    raise RuntimeError(f"the server did not come up (exit {proc.poll()}); log {log}:\n{tail}")


def stop_pid(pid: int, timeout_s: float = 60.0) -> list[int]:
    """SIGTERM to the server, then SIGKILL to whatever is left of its session (it leads one: `up`
    started it with a new session, so its process group is exactly what it started). Returns the
    PIDs that had to be killed."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _alive(pid):
        _reap(pid)
        time.sleep(0.2)
    left = session_pids(pid)
    for p in left:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _reap(pid)
    return left


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def session_pids(sid: int) -> list[int]:
    """Live processes (not zombies) whose session id is ``sid``: the server and anything it spawned."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # fields: state, ppid, pgrp, session
                out.append(int(d.name))
    return out


def _down(args) -> int:
    state = ServerState.load(args.state_file)
    if state is None:
        print(f"pdserve: down: no server recorded in {args.state_file}")
        return 0
    killed = stop_pid(state.pid)
    Path(args.state_file).unlink(missing_ok=True)
    left = session_pids(state.pid)
    print(f"pdserve: down: stopped pid {state.pid}" + (f" (killed leftovers {killed})" if killed else "")
          + (f"; STILL RUNNING: {left}" if left else ""))
    return 1 if left else 0


# -- clients -------------------------------------------------------------------------------------
def _status(args) -> int:
    """The server's workers with their state; a server that cannot be reached is one line and exit 2
    (a dead worker is not an error: it is shown, and the exit is 0)."""
    import grpc

    client = _client(args)
    try:
        s = client.status()
    except grpc.RpcError as e:
        target = getattr(client, "target", "the server")
        print(f"pdserve: status: no answer from {target} ({e.code().name}): is the server up? (`pdserve up`)",
              file=sys.stderr)
        return 2
    print(f"model {s.model}, policy {s.policy}: {'serving' if s.serving else 'NOT SERVING'}; {s.requests} requests, "
          f"{s.rejected} rejected, {s.in_flight} in flight")
    asked_by_state = hasattr(args, "state_file") and not getattr(args, "server", None)  # not a --server target
    state = ServerState.load(args.state_file or DEFAULT_STATE) if asked_by_state else None
    if state is not None and state.http_port >= 0:
        print(f"  OpenAI API {http_base(state)}/v1, dashboard {http_base(state)}/")
    for w in s.workers:
        placed = w.device + (f" GPU {','.join(w.gpu_ids)}" if w.gpu_ids else "") + (f" @{w.node}" if w.node else "")
        step = f"  in one step for {w.step_s:.1f} s" if w.step_s >= 1.0 else ""  # (a long step, or a stuck one)
        print(f"  {w.name:<12} {w.role:<8} {w.state or 'alive':<10} {placed:<12} running {w.running:>3}  "
              f"waiting {w.waiting:>3}  free blocks {w.free_blocks}/{w.capacity_blocks}  restarts {w.restarts}{step}")
    print(f"  store        {s.store_state or 'alive':<10} restarts {s.store_restarts}")
    for n in s.nodes:  # a multi-node topology: each node's store and workers
        print(f"  node {n.name:<8} {n.state:<6} store {n.store_state:<10} {n.blocks:>7} blocks  "
              f"{n.bytes / 2**20:9.1f} MiB  hit tokens {n.hit_tokens}  replicated in {n.replicated_blocks}  "
              f"workers {', '.join(n.workers) or '-'}")
    for t in s.tiers:
        print(f"  store {t.tier:<5} {t.blocks:>7} blocks  {t.bytes / 2**20:9.1f} MiB  hit tokens {t.hit_tokens}")
    partial = f" (+{s.delivered_partial_tokens} in partial blocks)" if s.delivered_partial_tokens else ""
    print(f"  cache hit tokens: predicted {s.predicted_hit_tokens}, delivered {s.delivered_hit_tokens}{partial}; "
          f"live leases {s.live_leases}; KV bytes moved {s.bytes_transferred}")
    if s.cost_model:
        slow = ", ".join(f"{w.name} {w.slowdown:.2f}" for w in s.workers)
        ttft = f"; TTFT {s.ttft_observed_over_predicted:.2f}" if s.ttft_observed_over_predicted else ""
        print(f"  cost model {s.cost_model}, observed / predicted time: {slow}{ttft}")
        if any(w.node for w in s.workers):  # several nodes: prefixes may cross them
            fetch = ", ".join(f"{w.name} {w.transfer_slowdown:.2f}" for w in s.workers if w.role == "prefill")
            print(f"  fetches from other nodes, observed / predicted time: {fetch}")
    print(f"  failures: {s.migrations} migrations, {s.recomputed_tokens} recomputed tokens, "
          f"{s.kv_load_failures} KV load failures")
    return 0


def _chat(args) -> int:
    if not args.embedded:
        return chat_session(_client(args), args)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="pdserve-chat-") as d:
        up_args = type("A", (), {"model": args.model, "port": 0, "config": None, "address": None})()
        print("[starting a local server on 127.0.0.1 ...]", file=sys.stderr)
        state = start_background(up_args, Path(d) / "server.json", 600.0)
        try:
            args.server = state.target
            return chat_session(_client(args), args)
        finally:
            stop_pid(state.pid)


def chat_session(client, args) -> int:
    import grpc

    messages = [{"role": "system", "content": args.system}] if args.system else []
    session, turns = f"chat-{uuid.uuid4().hex[:12]}", list(args.message)
    interactive = not turns
    while True:
        if interactive:
            try:
                line = input("> ").strip()
            except EOFError:
                return 0
            if not line:
                return 0
        elif not turns:
            return 0
        else:
            line = turns.pop(0)
            print(f"> {line}")
        messages.append({"role": "user", "content": line})
        sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature}
        if args.seed is not None:
            sampling["seed"] = args.seed
        reply = []
        try:
            for r in client.chat(messages, session_id=session, **sampling):
                if r.text:
                    reply.append(r.text)
                    print(r.text, end="", flush=True)
                if r.finished:
                    u, t = r.usage, r.timings
                    print(f"\n[{u.prompt_tokens} prompt tokens ({u.cached_tokens} cached), {u.completion_tokens} "
                          f"generated, finish: {r.finish_reason}, ttft {t.ttft_s:.2f}s, "
                          f"mean tbt {t.mean_tbt_s * 1e3:.0f} ms]", file=sys.stderr, flush=True)
        except grpc.RpcError as e:
            print(f"\npdserve: chat: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
        messages.append({"role": "assistant", "content": "".join(reply)})


def _bench_client(args):
    """(client, model name, context length, vocabulary size) for the chosen backend."""
    if args.backend == "grpc":
        client = _client(args)
        info = client.models().models[0]
        return client, info.name, info.max_seq_len, info.vocab_size
    from pdserve.bench_http import OpenAIClient

    base = args.base_url
    if not base:
        state = ServerState.load(args.state_file)
        if state is None or state.http_port < 0:
            raise ValueError(f"no server with an HTTP port in {args.state_file}: give --base-url http://HOST:PORT")
        base = http_base(state)
    client = OpenAIClient(base.rstrip("/").removesuffix("/v1"), os.environ.get("PDSERVE_TOKEN", ""), args.ca_file)
    card = client.models()
    client.model = card["id"]
    return client, card["id"], card["max_model_len"], card["vocab_size"]


def _bench(args) -> int:
    from pdserve import bench

    client, name, max_seq_len, vocab_size = _bench_client(args)
    max_prompt = max(1, max_seq_len - args.max_tokens - 1)
    if args.trace:
        jobs = bench.trace_jobs(args.trace, args.num_prompts, args.trace_tokens_per_block, max_prompt,
                                args.max_tokens, args.time_scale, vocab_size)
    else:
        jobs = bench.poisson_jobs(args.num_prompts, args.request_rate, min(args.input_len, max_prompt),
                                  args.max_tokens, vocab_size, args.seed)
    print(f"bench: {len(jobs)} requests to {client.target} ({name}, {args.backend}), concurrency {args.max_concurrency}, "
          f"{'trace ' + args.trace if args.trace else f'Poisson rate {args.request_rate}/s'}", file=sys.stderr)
    results, wall = bench.run(client, jobs, args.max_concurrency, args.request_timeout)
    print(bench.report(results, wall, args.ttft_slo_ms / 1000, args.tpot_slo_ms / 1000))
    return 0 if results and all(r.ok for r in results) else 1
