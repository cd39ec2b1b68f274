"""End to end through the gRPC front door: `pdserve up` in the background, a plain grpcio client,
`pdserve down`. One server (skv-tiny on a local Ray, 127.0.0.1) for the whole module."""
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gateway_server import Server, pdserve, readme_serving_commands
from pdserve.server_cli import session_pids
from protos.pdserve.v1 import pdserve_pb2 as pb

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    up = readme_serving_commands()[0]
    assert up[0] == "up" and "skv-tiny" in up
    s = Server(tmp_path_factory.mktemp("gw"), up=tuple(up))  # the README's own `pdserve up` line
    yield s
    if s.state_file.exists():
        s.down()


def chat_turn(server, messages, session):
    req = pb.ChatRequest(messages=[pb.ChatMessage(role=r, content=c) for r, c in messages], session_id=session,
                         sampling=pb.SamplingParams(max_tokens=8, ignore_eos=True))
    deltas, final = [], None
    for r in server.stub.Chat(req, timeout=60):
        if r.finished:
            final = r
        else:
            deltas.append(r)
    return "".join(d.text for d in deltas), sum(len(d.token_ids) for d in deltas), final


def test_a_three_turn_chat_hits_the_cache_on_turns_two_and_three(server):
    messages, finals = [("system", "You are a terse assistant.")], []
    for user in ("Hello there! What is the capital of France?", "And of Italy?", "Thanks, bye."):
        messages.append(("user", user))
        text, n_tokens, final = chat_turn(server, messages, "conv-e2e")
        assert final is not None and final.finish_reason == "length"
        assert final.usage.completion_tokens == n_tokens == 8
        assert final.timings.ttft_s > 0 and final.timings.e2e_s >= final.timings.ttft_s
        assert final.timings.p99_tbt_s >= final.timings.mean_tbt_s > 0
        finals.append(final)
        messages.append(("assistant", text))
    assert finals[0].usage.cached_tokens == 0
    for prev, cur in zip(finals, finals[1:]):
        assert cur.usage.prompt_tokens > prev.usage.prompt_tokens + prev.usage.completion_tokens
        assert cur.usage.cached_tokens > 0
        assert cur.usage.cached_tokens >= prev.usage.prompt_tokens - 16  # the whole previous prompt, but a block


def test_generate_streams_token_ids_and_text(server):
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(range(3, 40))),
                             sampling=pb.SamplingParams(max_tokens=5, ignore_eos=True))
    out = list(server.stub.Generate(req, timeout=60))
    assert out[-1].finished and out[-1].usage.prompt_tokens == 37 and out[-1].usage.completion_tokens == 5
    assert sum(len(r.token_ids) for r in out[:-1]) == 5
    assert len({r.request_id for r in out}) == 1


def test_health_reflection_models_status_metrics(server):
    messages = [("user", "Hello there! What is the capital of France?")]
    before = server.stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=30)
    # its own requests and cache hit, so the counters below hold run alone or in any order
    cached = sum(chat_turn(server, messages, "conv-status")[2].usage.cached_tokens for _ in range(2))
    health = health_pb2_grpc.HealthStub(server.channel)
    for name in ("", "pdserve.v1.PDServe"):
        assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    [resp] = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                            timeout=10))
    names = {s.name for s in resp.list_services_response.service}
    assert {"pdserve.v1.PDServe", "grpc.health.v1.Health"} <= names
    [model] = server.stub.ListModels(pb.ListModelsRequest(), timeout=10).models
    assert model.name == "skv-tiny" and model.block_size == 16 and model.has_chat_template
    status = server.stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=30)
    assert {w.role for w in status.workers} == {"prefill", "decode"} and status.requests >= 2
    assert status.delivered_hit_tokens > 0 and status.tiers[0].blocks > 0
    delivered = [s.delivered_hit_tokens + s.delivered_partial_tokens for s in (before, status)]
    assert cached > 0 and delivered[1] - delivered[0] == cached  # whole blocks and the partial rest: what clients got
    assert all(0 <= w.free_blocks <= w.capacity_blocks and w.capacity_blocks > 0 for w in status.workers)
    assert server.state["log"] == str(server.state_file.with_suffix(".log"))  # the state file names the server's log
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.state['metrics_port']}/metrics", timeout=10).read().decode()
    assert 'pdserve:time_to_first_token_seconds_count{model_name="skv-tiny"}' in body
    assert "pdserve:inter_token_latency_seconds_bucket" in body and "pdserve:prefix_cache_hits_total" in body


def test_readme_client_examples_run(server):
    cmds = readme_serving_commands()
    assert [c[0] for c in cmds] == ["up", "status", "generate", "chat", "bench", "down"]
    for cmd in cmds[1:-1]:
        out = pdserve(*cmd, "--state-file", str(server.state_file), timeout=180)
        assert out.returncode == 0, (cmd, out.stdout, out.stderr)


def test_readme_grpc_python_example_runs(server, capsys):
    import re
    from pathlib import Path

    text = (Path(__file__).parent.parent / "README.md").read_text()
    code = re.search(r"## The gRPC API.*?```python\n(.*?)```", text, re.S).group(1)
    exec(compile(code.replace("127.0.0.1:50051", server.target), "README.md", "exec"), {})
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.search(r"(length|stop) \d+ [0-9.e-]+$", last), last  # finish reason, cached tokens, TTFT

def test_cli_generate_chat_and_bench_over_grpc(server):
    sf = str(server.state_file)
    out = pdserve("generate", "--server", "--state-file", sf, "--max-tokens", "6", "Hello, cluster!")
    assert out.returncode == 0 and "6 tokens, finish: length" in out.stderr, out.stderr
    out = pdserve("chat", "--state-file", sf, "-m", "Hi there, first turn", "-m", "second turn", "--max-tokens", "5")
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("generated, finish:") == 2 and out.stderr.count("(0 cached)") == 1
    bad = pdserve("generate", "--server", server.target, "--top-p", "0", "hi")
    assert bad.returncode == 2 and "INVALID_ARGUMENT: sampling.top_p" in bad.stderr
    out = pdserve("bench", "--state-file", sf, "--num-prompts", "12", "--request-rate", "20", "--max-concurrency", "4",
                  "--input-len", "40", "--max-tokens", "6")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Successful requests:                    12" in out.stdout and "P99 ITL (ms):" in out.stdout


def test_cli_status_and_down_leave_no_process_behind(server):
    out = pdserve("status", "--state-file", str(server.state_file), timeout=60)
    assert out.returncode == 0 and "decode-0" in out.stdout, out.stderr
    assert f"dashboard http://127.0.0.1:{server.state['http_port']}/" in out.stdout
    pid = server.state["pid"]
    assert session_pids(pid)  # the server and the Ray processes it started
    server.channel.close()
    down = readme_serving_commands()[-1]
    out = pdserve(*down, "--state-file", str(server.state_file))  # the README's `pdserve down` line
    assert out.returncode == 0 and f"stopped pid {pid}" in out.stdout, out.stdout + out.stderr
    assert session_pids(pid) == []
    assert not server.state_file.exists()
    with pytest.raises(grpc.RpcError):
        health_pb2_grpc.HealthStub(grpc.insecure_channel(server.target)).Check(health_pb2.HealthCheckRequest(),
                                                                              timeout=3)
