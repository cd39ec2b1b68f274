"""The OpenAI HTTP edge end to end: `pdserve up` (skv-tiny on a local Ray, 127.0.0.1) with its HTTP
server, the official `openai` client, curl, and raw httpx for a disconnect. One server for the module;
the gRPC stub of the same server reads the cluster's lease and block stats."""
import json
import re
import shutil
import subprocess
import time

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway_server import Server
from protos.pdserve.v1 import pdserve_pb2 as pb

pytestmark = pytest.mark.slow
CONFIG = """
[cluster]
policy = "mooncake"      # rejects early what would miss its SLO (the tests ask for impossible SLOs)
[slo]
ttft_ms = 600000
tbt_ms = 5000
[server]
http_port = 0
max_tokens_limit = 1000
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("http"), CONFIG)
    assert s.state["http_port"] > 0
    s.base = f"http://127.0.0.1:{s.state['http_port']}"
    yield s
    s.down()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=120)


def wait_idle(server, timeout_s=60):
    """Nothing held: no lease, no request in flight, every decode block free."""
    deadline = time.time() + timeout_s
    while True:
        s = server.stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=30)
        decode = [w for w in s.workers if w.role == "decode"]
        if s.live_leases == 0 and s.in_flight == 0 and all(w.running == w.waiting == 0 for w in decode) \
                and all(w.free_blocks == w.capacity_blocks for w in decode):
            return s
        assert time.time() < deadline, f"the cluster did not go idle: {s}"
        time.sleep(0.3)


def test_chat_and_completions_stream_and_not_with_the_openai_client(server, client):
    r = client.chat.completions.create(model="skv-tiny", messages=[{"role": "user", "content": "Hello!"}],
                                       max_tokens=6, extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.model == "skv-tiny"
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6
    chunks = list(client.chat.completions.create(
        model="skv-tiny", messages=[{"role": "user", "content": "Hello!"}], max_tokens=6, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content  # greedy: the same reply, streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6

    c = client.completions.create(model="skv-tiny", prompt="Once upon a time", max_tokens=5, temperature=0.7,
                                  top_p=0.9, seed=3, extra_body={"ignore_eos": True})
    assert c.object == "text_completion" and c.usage.completion_tokens == 5 and c.choices[0].text
    again = client.completions.create(model="skv-tiny", prompt="Once upon a time", max_tokens=5, temperature=0.7,
                                      top_p=0.9, seed=3, extra_body={"ignore_eos": True})
    assert again.choices[0].text == c.choices[0].text  # seeded sampling repeats
    streamed = list(client.completions.create(model="skv-tiny", prompt=list(range(3, 40)), max_tokens=5,
                                              stream=True, logprobs=0, extra_body={"ignore_eos": True}))
    lps = [lp for s in streamed if s.choices and s.choices[0].logprobs for lp in s.choices[0].logprobs.token_logprobs]
    assert len(lps) == 5 and all(lp <= 0 for lp in lps)
    assert [m.id for m in client.models.list().data] == ["skv-tiny"]


def test_second_turn_of_a_session_reads_cached_tokens(server, client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2 + 2?"}]
    first = client.chat.completions.create(model="skv-tiny", messages=messages, max_tokens=8,
                                           extra_body={"ignore_eos": True}, extra_headers={"x-session-id": "conv-h"})
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And 3 + 3?"}]
    second = client.chat.completions.create(model="skv-tiny", messages=messages, max_tokens=8,
                                            extra_body={"ignore_eos": True}, extra_headers={"x-session-id": "conv-h"})
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens - 16, (cached, first.usage)  # the whole first turn, but a block
    third = client.chat.completions.create(model="skv-tiny", messages=messages, max_tokens=4, user="conv-h",
                                           extra_body={"ignore_eos": True})  # the session from `user`
    assert third.usage.prompt_tokens_details.cached_tokens > 0


def test_early_rejection_is_a_429_rate_limit_error_with_retry_after(server, client):
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model="skv-tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       extra_body={"slo": {"ttft_ms": 1e-6}})
    assert e.value.status_code == 429 and e.value.response.headers["retry-after"] == "1"
    assert "rejected: predicted TTFT" in e.value.message and e.value.code == "rejected"
    wait_idle(server)


def test_a_bad_field_is_a_400_naming_it(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="skv-tiny", messages=[{"role": "user", "content": "hi"}], temperature=-1)
    assert e.value.status_code == 400 and e.value.param == "temperature"
    assert e.value.body["message"].startswith("temperature: -1.0 is outside")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="skv-tiny", messages=[{"role": "user", "content": "hi"}], n=3)
    assert e.value.param == "n"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-" + "x" * 5000, messages=[{"role": "user", "content": "hi"}])
    assert "5,004 characters" in e.value.message and len(e.value.message) < 200


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_shows_sse_frames(server):
    body = json.dumps({"model": "skv-tiny", "prompt": "Hello", "max_tokens": 4, "stream": True, "ignore_eos": True})
    out = subprocess.run(["curl", "-N", "-sS", "--max-time", "60", server.base + "/v1/completions",
                          "-H", "Content-Type: application/json", "-d", body], capture_output=True, text=True,
                         timeout=90)
    assert out.returncode == 0, out.stderr
    frames = [line for line in out.stdout.split("\n\n") if line]
    print(out.stdout)
    assert frames[-1] == "data: [DONE]" and all(f.startswith("data: {") for f in frames[:-1])
    assert [json.loads(f[6:])["choices"][0]["finish_reason"] for f in frames[:-1]][-1] == "length"


def test_a_client_disconnect_mid_stream_frees_blocks_and_leases(server):
    """The stream would take 900 tokens; the client leaves after two frames. While it streams the decode
    worker holds its blocks; once it is gone nothing is held and the cluster serves again."""
    body = {"model": "skv-tiny", "prompt": list(range(3, 60)), "max_tokens": 900, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.base + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(4)]  # two frames and their blank separators
            held = server.stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=30)
            decode = [w for w in held.workers if w.role == "decode"]
            assert sum(w.running for w in decode) == 1 and any(w.free_blocks < w.capacity_blocks for w in decode)
            assert got[0].startswith("data: {")
        # leaving the `with` closes the connection mid-stream
    t0 = time.time()
    idle = wait_idle(server, timeout_s=30)
    gone_s = time.time() - t0
    metrics = httpx.get(f"http://127.0.0.1:{server.state['metrics_port']}/metrics", timeout=10).text
    assert 'pdserve:num_requests_in_gateway{model_name="skv-tiny"} 0.0' in metrics
    t0 = time.time()
    r = httpx.post(server.base + "/v1/completions", json={**body, "stream": False, "max_tokens": 100}, timeout=60)
    full_s = (time.time() - t0) * 9  # what the 900 tokens would have taken, at least
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 100
    print(f"idle {gone_s:.2f}s after the disconnect (the whole stream: ~{full_s:.1f}s); leases {idle.live_leases}")
    assert gone_s < full_s / 2  # cancelled, not run to its end
    with pytest.raises(httpx.ReadTimeout):  # not streamed: the client gives up after 1 s and hangs up
        httpx.post(server.base + "/v1/completions", json={**body, "stream": False}, timeout=httpx.Timeout(60, read=1))
    t0 = time.time()
    wait_idle(server, timeout_s=30)
    assert time.time() - t0 < full_s / 2


def test_health_is_the_grpc_health(server):
    grpc_health = health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    r = httpx.get(server.base + "/health", timeout=10)
    assert grpc_health.status == health_pb2.HealthCheckResponse.SERVING
    assert r.status_code == 200 and r.json() == {"status": "SERVING"}
    with pytest.raises(grpc.RpcError):  # (the gRPC port does not speak HTTP/1.1 JSON and vice versa)
        grpc_health_on_http = grpc.insecure_channel(server.base[len("http://"):])
        health_pb2_grpc.HealthStub(grpc_health_on_http).Check(health_pb2.HealthCheckRequest(), timeout=3)


def test_bench_replays_the_same_workload_over_grpc_and_http(server, capsys):
    from pdserve.cli import main

    common = ["bench", "--state-file", str(server.state_file), "--num-prompts", "4", "--max-concurrency", "2",
              "--input-len", "24", "--max-tokens", "3"]
    for backend in ("grpc", "openai"):
        assert main([*common, "--backend", backend]) == 0  # in this process: no interpreter start per run
        out = capsys.readouterr()
        assert f"skv-tiny, {backend}" in out.err
        assert re.search(r"Successful requests:\s+4\n", out.out) and re.search(r"Total generated tokens:\s+12\n",
                                                                               out.out), out.out
        assert re.search(r"Mean TTFT \(ms\):\s+[1-9]", out.out), out.out
