"""A server of the default model (`pdserve up`, SmolLM2-135M in int8, 127.0.0.1): the openai client
chats with it over HTTP, and the live dashboard at `/` shows its workers and requests in headless
Chromium (Debian's `chromium`; `.ci/run` installs it) with no console errors. One server for the session
(tests/conftest.py's ``default_server``: the one the README quick start's chat runs against too)."""
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--enable-logging=stderr",
         "--v=0", "--window-size=1280,960"]


@pytest.fixture
def server(default_server):
    """`pdserve up --port 0`: no model named, so the default, and the HTTP API on a free port (the default too);
    one server for the session, shared with tests/test_cli.py's quick start (tests/conftest.py)."""
    return default_server


def test_the_default_model_chats_over_http_with_the_openai_client(server):
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=300)
    r = client.chat.completions.create(model="smollm2-135m", max_tokens=8,
                                       messages=[{"role": "user", "content": "What is the capital of France?"}])
    print("reply:", r.choices[0].message.content)
    assert r.model == "smollm2-135m" and r.usage.completion_tokens <= 8 and "Paris" in r.choices[0].message.content
    chunks = list(client.chat.completions.create(
        model="smollm2-135m", max_tokens=8, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "What is the capital of France?"}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again: a cache hit


def test_the_default_model_answers_arithmetic_greedily(server):
    """Issue 19's bar for the default: greedy chat answers "What is 2+2?" with 4 (and France with Paris, above)."""
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=300)
    r = client.chat.completions.create(model="smollm2-135m", max_tokens=12, temperature=0,
                                       messages=[{"role": "user", "content": "What is 2+2?"}])
    print("reply:", r.choices[0].message.content)
    assert re.search(r"\b4\b|\bfour\b", r.choices[0].message.content, re.I)


def chromium(url: str, *action: str, budget_ms: int = 4000) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="pdserve-chromium-") as profile:
        return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
                               *action, url], capture_output=True, text=True, timeout=120)


def console_lines(stderr: str) -> list[str]:
    """What the page wrote to the console (logs, errors, uncaught exceptions): our page writes none."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium)")
def test_the_dashboard_shows_workers_and_requests_in_headless_chromium(server, tmp_path):
    r = httpx.post(server.base + "/v1/completions", json={"prompt": "Hello", "max_tokens": 2}, timeout=120)
    assert r.status_code == 200
    page = httpx.get(server.base + "/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets and not [a for a in assets if "//" in a], assets  # no external assets
    for a in assets:
        if not a.startswith("data:"):
            assert httpx.get(server.base + a, timeout=30).status_code == 200, a
    data = httpx.get(server.base + "/dashboard.json", timeout=30).json()
    assert data["requests"]["total"] >= 1 and {w["role"] for w in data["workers"]} == {"prefill", "decode"}

    out = chromium(server.base + "/", "--dump-dom")
    assert out.returncode == 0, out.stderr[-2000:]
    dom = out.stdout
    assert console_lines(out.stderr) == [], console_lines(out.stderr)
    assert 'class="pill ok">serving<' in dom, dom[:2000]
    for name in ("prefill-0", "decode-0"):
        assert f"<td>{name}</td>" in dom
    assert re.search(r'<td class="state-alive">alive</td>', dom)
    total = int(re.search(r'id="req-total">(\d+)<', dom).group(1))
    assert total >= 1, dom[:2000]
    assert re.search(r'id="ttft-p50">\d+\.\d<', dom)  # a measured percentile, not "-"

    shot = tmp_path / "dashboard.png"
    out = chromium(server.base + "/", f"--screenshot={shot}")
    assert out.returncode == 0 and shot.stat().st_size > 10_000, out.stderr[-2000:]
    assert console_lines(out.stderr) == []
    print(f"dashboard screenshot: {shot}")
    print("dashboard.json:", json.dumps(data)[:600])


def test_readme_openai_example_runs(server, capsys):
    text = (Path(__file__).parent.parent / "README.md").read_text()
    code = re.search(r"## The OpenAI HTTP API.*?```python\n(.*?)```", text, re.S).group(1)
    code = code.replace("http://127.0.0.1:8000", server.base).replace("max_tokens=32", "max_tokens=6")
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "Paris" in out and "prompt_tokens_details" in out, out
