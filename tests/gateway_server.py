"""A `pdserve up` server in the background for one test module (skv-tiny, 127.0.0.1, free ports)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc

from protos.pdserve.v1 import pdserve_pb2_grpc as pb_grpc


def readme_serving_commands() -> list[list[str]]:
    """The README's `pdserve up | status | generate | chat | bench | down` example, one argv each
    (a free port instead of 50051, so tests never collide)."""
    import re
    import shlex

    text = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"## Serving: .*?```bash\n(.*?)```", text, re.S).group(1)
    cmds = [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.startswith("pdserve ")]
    return [[a if a != "50051" else "0" for a in c[1:]] for c in cmds]


def pdserve(*args, timeout=120):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    return subprocess.run([sys.executable, "-m", "pdserve.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


class Server:
    def __init__(self, tmp: Path, config: str = "", up: tuple[str, ...] = ("up", "--model", "skv-tiny", "--port", "0")):
        self.state_file = tmp / "server.json"
        args = [*up, "--state-file", str(self.state_file), "--timeout", "240"]
        if config:
            (tmp / "pdserve.toml").write_text(config)
            args += ["--config", str(tmp / "pdserve.toml")]
        out = pdserve(*args, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        self.state = json.loads(self.state_file.read_text())
        self.target = self.state["target"]
        self.channel = grpc.insecure_channel(self.target)
        self.stub = pb_grpc.PDServeStub(self.channel)

    def down(self):
        self.channel.close()
        return pdserve("down", "--state-file", str(self.state_file), timeout=120)


def self_signed_cert(tmp: Path) -> tuple[Path, Path]:
    """(key, cert) for CN localhost and IP 127.0.0.1, made by openssl; skips the test without it."""
    import shutil

    import pytest

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return key, cert
