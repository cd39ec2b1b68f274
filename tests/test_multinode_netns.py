"""Two hosts of their own: network namespaces made by this test, joined by a veth pair with
addresses of their own (10.217.x.0/30), `ray start --head` in one and `ray start --address` in the
other, and a request prefilled on the first host whose KV the second host's decode worker pulls
across the veth (Ray moves the bytes). Skips, saying why, where the machine refuses namespaces.

Everything started here runs in a session of its own (``start_new_session``); teardown ends those
sessions' processes by PID and deletes the namespaces (which deletes the veth pair too).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from model.config import QuantConfig
from model.engine import Engine, EngineConfig, SamplingParams
from model.loader import load
from pdserve.server_cli import session_pids

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
PROMPT = list(range(7, 7 + 45))
PARAMS = SamplingParams(max_tokens=10, ignore_eos=True)
DRIVER = textwrap.dedent("""
    # what `pdserve up --address ... --config` builds: the config's [topology] placed on the Ray cluster
    import json, sys, time
    sys.path.insert(0, {repo!r})
    import ray
    from model.engine import SamplingParams
    from pdserve.config import parse
    from pdserve.gateway import status_message
    from pdserve.server import build_cluster, join_ray
    join_ray({address!r})  # what build_cluster does with --address, here before waiting for host b
    deadline = time.monotonic() + 120
    while sum(n["Alive"] for n in ray.nodes()) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    cfg = parse({{"cluster": {{"model": "skv-tiny", "kv_cache_bytes": 33554432}},
                 "topology": {{"nodes": [{{"name": "a", "match": "box-a", "prefill": 1}},
                                        {{"name": "b", "match": "box-b", "decode": 1}}]}}}})
    c = build_cluster(cfg, None)  # joined already: the cluster runs on this Ray
    try:
        tokens, last, handoff = c.generate({prompt!r}, SamplingParams(max_tokens=10, ignore_eos=True))
        ips = {{n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}}
        status = status_message("skv-tiny", c.status())
        print("RESULT " + json.dumps({{"tokens": tokens, "kv_tokens": handoff.kv_tokens,
            "ips": {{name: ips[c.node_ids[name]] for name in ("a", "b")}},
            "nodes": {{n.name: [n.state, n.store_state, list(n.workers), n.bytes_transferred] for n in status.nodes}},
            "decode_recomputed": c.loads()["decode-0"]["recomputed_tokens"]}}))
    finally:
        c.shutdown()
        ray.shutdown()
""")


def run(*cmd, check=True):
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=60)


def wait_for_port(netns: str, host: str, port: int, timeout_s: float = 60.0) -> None:
    """Until something in ``netns`` listens on host:port (a TCP connect from inside it), or timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        probe = subprocess.run(["ip", "netns", "exec", netns, "bash", "-c", f"exec 3<>/dev/tcp/{host}/{port}"],
                               capture_output=True, timeout=10)
        if probe.returncode == 0:
            return
        time.sleep(0.25)


@pytest.fixture
def hosts():
    """Two namespaces a and b with a veth between them; yields (run-in-namespace prefix, addresses)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (ip) here")
    tag = f"{os.getpid() % 100000}"
    ns = {"a": f"pd17a{tag}", "b": f"pd17b{tag}"}
    addr = {"a": "10.217.0.1", "b": "10.217.0.2"}
    made = []
    try:
        for name in ns.values():
            run("ip", "netns", "add", name)
            made.append(name)
            run("ip", "-n", name, "link", "set", "lo", "up")
        run("ip", "link", "add", f"v17a{tag}", "netns", ns["a"], "type", "veth", "peer", "name", f"v17b{tag}",
            "netns", ns["b"])
        for side in "ab":
            run("ip", "-n", ns[side], "addr", "add", f"{addr[side]}/30", "dev", f"v17{side}{tag}")
            run("ip", "-n", ns[side], "link", "set", f"v17{side}{tag}", "up")
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        for name in made:
            run("ip", "netns", "del", name, check=False)
        reason = getattr(e, "stderr", "") or str(e)
        pytest.skip(f"this machine refuses network namespaces / veth: {reason.strip()[:200]}")
    try:
        yield ns, addr
    finally:
        for name in made:
            run("ip", "netns", "del", name, check=False)


def test_a_request_whose_kv_crosses_two_network_namespaces(hosts):
    ns, addr = hosts
    tmp = tempfile.mkdtemp(prefix="pd17-", dir="/tmp")  # short: Ray's socket paths live under it
    # Ray binds the namespaces' own addresses (not loopback only, or host b could not join host a):
    # each namespace's only interfaces are its loopback and this test's veth, unreachable from outside
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    env.update(HOME=tmp, RAY_AUTH_MODE="disabled", RAY_TMPDIR=tmp, OMP_NUM_THREADS="1")
    ray_bin = str(Path(sys.executable).parent / "ray")
    common = ["--block", "--num-cpus=1", "--object-store-memory=150000000", "--disable-usage-stats"]
    started = []

    def log(name):
        return open(Path(tmp) / f"{name}.log", "w")

    try:
        started.append(subprocess.Popen(
            ["ip", "netns", "exec", ns["a"], ray_bin, "start", "--head", f"--node-ip-address={addr['a']}",
             "--port=6391", "--include-dashboard=false", f"--temp-dir={tmp}/ray", '--resources={"box-a": 1}',
             *common], env=env, start_new_session=True, stdout=log("head"), stderr=subprocess.STDOUT))
        wait_for_port(ns["a"], addr["a"], 6391)  # the head's GCS: host b joins it (it retries past this too)
        started.append(subprocess.Popen(
            ["ip", "netns", "exec", ns["b"], ray_bin, "start", f"--address={addr['a']}:6391",
             f"--node-ip-address={addr['b']}", '--resources={"box-b": 1}', *common],
            env=env, start_new_session=True, stdout=log("worker"), stderr=subprocess.STDOUT))
        script = Path(tmp) / "driver.py"
        script.write_text(DRIVER.format(repo=str(REPO), address=f"{addr['a']}:6391", prompt=PROMPT))
        driver = subprocess.Popen(["ip", "netns", "exec", ns["a"], sys.executable, str(script)], env=env,
                                  start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(driver)
        out, err = driver.communicate(timeout=300)
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        logs = "".join(f"--- {p.name}:\n{p.read_text()[-1500:]}\n" for p in Path(tmp).glob("*.log"))
        assert driver.returncode == 0 and lines, f"driver failed ({driver.returncode}):\n{err[-3000:]}\n{logs}"
        got = json.loads(lines[-1][len("RESULT "):])
    finally:
        for p in started:  # our sessions only: ray start's raylet, GCS and workers live in them
            for pid in session_pids(p.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
    assert got["ips"] == addr  # the prefill worker's store on host a, the decode worker on host b
    assert got["kv_tokens"] == len(PROMPT) and got["decode_recomputed"] == 0
    a, b = got["nodes"]["a"], got["nodes"]["b"]  # what `pdserve status` shows per node
    assert a[:3] == ["alive", "alive", ["prefill-0"]] and b[:3] == ["alive", "alive", ["decode-0"]]
    assert a[3] > 0  # bytes left host a's store
    engine = Engine(load("skv-tiny", quant=QuantConfig()).model, EngineConfig(kv_cache_bytes=64 * 2**20, max_seqs=1))
    assert got["tokens"] == engine.generate([PROMPT], PARAMS)[0]
