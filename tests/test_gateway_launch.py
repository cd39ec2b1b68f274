"""How operators launch: `pdserve up --address` joining a Ray cluster started with `ray start --head`
(127.0.0.1 only), whose `down` leaves the operator's Ray running; and `up --config` with TLS and a
bearer token, driven by the CLI's own clients."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway_server import Server, pdserve, self_signed_cert
from pdserve.server_cli import session_pids
from protos.pdserve.v1 import pdserve_pb2 as pb

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"ray start exited with {proc.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"Ray's GCS did not listen on 127.0.0.1:{port} within {timeout_s} s")


@pytest.fixture()
def ray_head(tmp_path):
    """`ray start --head --block` in its own session, so the test stops exactly what it started."""
    port = free_port()
    ray = Path(sys.executable).with_name("ray")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    log = open(tmp_path / "ray-head.log", "w")
    proc = subprocess.Popen([str(ray), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    try:
        wait_listening(port, proc, 120)
        yield f"127.0.0.1:{port}", proc
    finally:
        if proc.poll() is None:
            proc.terminate()  # `ray start --block` stops its daemons on SIGTERM
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        for pid in session_pids(proc.pid):  # Ray's own daemons of that session, if any outlived it
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        current = Path("/tmp/ray/ray_current_cluster")  # `ray start` leaves its address here: ours goes with it
        if current.is_file() and current.read_text().strip() == f"127.0.0.1:{port}":
            current.unlink()


def test_up_joins_a_ray_cluster_started_with_ray_start_and_down_leaves_it_running(ray_head, tmp_path):
    address, head = ray_head
    server = Server(tmp_path, up=("up", "--model", "skv-tiny", "--port", "0", "--address", address))
    try:
        assert server.state["ray_address"] == address
        req = pb.GenerateRequest(text="hello over the operator's cluster",
                                 sampling=pb.SamplingParams(max_tokens=4, ignore_eos=True))
        out = list(server.stub.Generate(req, timeout=120))
        assert out[-1].finished and out[-1].finish_reason == "length"
        assert sum(len(r.token_ids) for r in out[:-1]) == 4
        status = server.stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=30)
        assert {w.role for w in status.workers} == {"prefill", "decode"}
        server_pid = server.state["pid"]
    finally:
        down = server.down()
    assert down.returncode == 0, down.stdout + down.stderr
    assert not session_pids(server_pid)  # the server and everything it started are gone
    assert head.poll() is None, "pdserve down must not stop the operator's Ray cluster"
    again = pdserve("status", "--state-file", str(server.state_file), timeout=60)
    assert again.returncode != 0


def test_up_with_tls_and_a_token_from_the_config_serves_the_cli_clients(tmp_path, monkeypatch):
    key, cert = self_signed_cert(tmp_path)
    monkeypatch.setenv("PDSERVE_TEST_TOKEN", "s3cret")
    state = tmp_path / "server.json"
    (tmp_path / "tls.toml").write_text(f'[cluster]\nmodel = "skv-tiny"\n[server]\nport = 0\ntls_cert = "{cert}"\n'
                                       f'tls_key = "{key}"\nauth_token_env = "PDSERVE_TEST_TOKEN"\n')
    up = pdserve("up", "--config", str(tmp_path / "tls.toml"), "--state-file", str(state), "--timeout", "240",
                 timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        tls = ("--state-file", str(state), "--ca-file", str(cert))
        monkeypatch.setenv("PDSERVE_TOKEN", "wrong")
        refused = pdserve("status", *tls, timeout=60)
        assert refused.returncode != 0 and "UNAUTHENTICATED" in refused.stdout + refused.stderr
        monkeypatch.setenv("PDSERVE_TOKEN", "s3cret")
        status = pdserve("status", *tls, timeout=60)
        assert status.returncode == 0 and "prefill-0" in status.stdout, status.stdout + status.stderr
        gen = pdserve("generate", "--server", *tls, "--max-tokens", "4", "hello over TLS", timeout=120)
        assert gen.returncode == 0 and "4 tokens, finish: length" in gen.stdout + gen.stderr, gen.stdout + gen.stderr
    finally:
        down = pdserve("down", "--state-file", str(state), timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
