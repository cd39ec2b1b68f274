"""Bad input over the gRPC boundary gets the right status code and a message naming the field, and
the server keeps serving. Then load: 200 concurrent streams against 1 prefill + 1 decode worker,
each ending in a completion or an explicit status, with no lease left. One server for the module."""
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway_server import Server
from protos.pdserve.v1 import pdserve_pb2 as pb

pytestmark = pytest.mark.slow
C = grpc.StatusCode
CONFIG = """
[cluster]
policy = "mooncake"      # a policy that rejects early what would miss its SLO
[slo]
ttft_ms = 600000         # generous defaults: only the requests that ask for tight SLOs are refused
tbt_ms = 5000
[server]
max_message_bytes = 65536
max_tokens_limit = 512
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("gw-bad"), CONFIG)
    yield s
    s.down()


def gen(**kw):
    sampling = kw.pop("sampling", {})
    if "token_ids" not in kw and "text" not in kw:
        kw["token_ids"] = pb.TokenIds(ids=list(range(3, 30)))
    return pb.GenerateRequest(sampling=pb.SamplingParams(**{"max_tokens": 4, **sampling}), **kw)


def still_serving(server):
    health = health_pb2_grpc.HealthStub(server.channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    out = list(server.stub.Generate(gen(sampling={"ignore_eos": True}), timeout=60))
    assert out[-1].finished and out[-1].usage.completion_tokens == 4


BAD = [
    (gen(text=""), C.INVALID_ARGUMENT, "text: empty prompt"),
    (pb.GenerateRequest(), C.INVALID_ARGUMENT, "prompt: give text or token_ids"),
    (gen(token_ids=pb.TokenIds(ids=[])), C.INVALID_ARGUMENT, "token_ids: empty prompt"),
    (gen(token_ids=pb.TokenIds(ids=[5, 99999])), C.INVALID_ARGUMENT, "token_ids: token id 99999"),
    (gen(token_ids=pb.TokenIds(ids=[5] * 2000)), C.INVALID_ARGUMENT, "prompt: 2000 tokens exceeds"),
    (gen(model="gpt-17"), C.NOT_FOUND, "model: unknown model 'gpt-17'"),
    (gen(model="m" * 60000), C.NOT_FOUND, "model: unknown model 'mmm"),  # echoed cut: still a NOT_FOUND
    (gen(text="x" * 60000), C.INVALID_ARGUMENT, "text: 60,000 bytes of text are at least"),  # not tokenized
    (gen(sampling={"max_tokens": 0}), C.INVALID_ARGUMENT, "sampling.max_tokens: 0"),
    (gen(sampling={"max_tokens": 4_000_000_000}), C.INVALID_ARGUMENT, "sampling.max_tokens: 4000000000"),
    (gen(sampling={"max_tokens": 500}, token_ids=pb.TokenIds(ids=[5] * 600)), C.INVALID_ARGUMENT,
     "exceeds the model's context of 1024"),
    (gen(sampling={"temperature": -1}), C.INVALID_ARGUMENT, "sampling.temperature"),
    (gen(sampling={"temperature": float("nan")}), C.INVALID_ARGUMENT, "sampling.temperature"),
    (gen(sampling={"top_p": 0}), C.INVALID_ARGUMENT, "sampling.top_p"),
    (gen(sampling={"top_p": 1.5}), C.INVALID_ARGUMENT, "sampling.top_p"),
    (gen(sampling={"top_k": 100000}), C.INVALID_ARGUMENT, "sampling.top_k"),
    (gen(sampling={"seed": -3}), C.INVALID_ARGUMENT, "sampling.seed"),
    (gen(sampling={"stop": [""]}), C.INVALID_ARGUMENT, "sampling.stop"),
    (gen(sampling={"stop": ["x"] * 17}), C.INVALID_ARGUMENT, "sampling.stop"),
    (gen(slo=pb.SLOHints(ttft_ms=-5)), C.INVALID_ARGUMENT, "slo.ttft_ms"),
    (gen(slo=pb.SLOHints(tbt_ms=float("inf"))), C.INVALID_ARGUMENT, "slo.tbt_ms"),
    (gen(priority=1000), C.INVALID_ARGUMENT, "priority: 1000"),
    (gen(session_id="s" * 300), C.INVALID_ARGUMENT, "session_id"),
    (gen(request_id="bad id!"), C.INVALID_ARGUMENT, "request_id"),
]


@pytest.mark.parametrize("request_, code, message", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_generate_fields(server, request_, code, message):
    with pytest.raises(grpc.RpcError) as e:
        list(server.stub.Generate(request_, timeout=30))
    assert e.value.code() == code and message in e.value.details(), e.value.details()


@pytest.mark.parametrize("messages, message", [
    ([], "messages: at least one message"),
    ([("robot", "hi")], "messages[0].role: 'robot'"),
    ([("user", "hi"), ("", "x")], "messages[1].role"),
    ([("user", "y" * 30000), ("user", "z" * 30000)], "messages: 60,000 bytes of text are at least"),
])
def test_bad_chat_fields(server, messages, message):
    req = pb.ChatRequest(messages=[pb.ChatMessage(role=r, content=c) for r, c in messages])
    with pytest.raises(grpc.RpcError) as e:
        list(server.stub.Chat(req, timeout=30))
    assert e.value.code() == C.INVALID_ARGUMENT and message in e.value.details()


def test_oversize_message_is_refused(server):
    with pytest.raises(grpc.RpcError) as e:
        list(server.stub.Generate(gen(text="x" * 100_000), timeout=30))
    assert e.value.code() == C.RESOURCE_EXHAUSTED
    still_serving(server)


def test_expired_deadline_and_cancel_mid_stream_free_everything(server):
    with pytest.raises(grpc.RpcError) as e:
        list(server.stub.Generate(gen(sampling={"max_tokens": 400, "ignore_eos": True}), timeout=0.5))
    assert e.value.code() == C.DEADLINE_EXCEEDED
    call = server.stub.Generate(gen(sampling={"max_tokens": 400, "ignore_eos": True}), timeout=60)
    first = next(call)
    assert first.token_ids
    call.cancel()
    with pytest.raises(grpc.RpcError) as e:
        list(call)
    assert e.value.code() == C.CANCELLED
    wait_idle(server)
    still_serving(server)


def test_duplicate_request_id_and_stop_strings(server):
    call = server.stub.Generate(gen(request_id="dup-1", sampling={"max_tokens": 300, "ignore_eos": True}), timeout=60)
    next(call)
    with pytest.raises(grpc.RpcError) as e:
        list(server.stub.Generate(gen(request_id="dup-1"), timeout=30))
    assert e.value.code() == C.ALREADY_EXISTS and "request_id" in e.value.details()
    call.cancel()
    full = "".join(r.text for r in server.stub.Generate(gen(sampling={"max_tokens": 40, "ignore_eos": True}), timeout=60))
    assert len(full) >= 10
    stop = full[5:8]
    out = list(server.stub.Generate(gen(sampling={"max_tokens": 40, "ignore_eos": True, "stop": [stop]}), timeout=60))
    assert out[-1].finish_reason == "stop" and "".join(r.text for r in out) == full[:full.index(stop)]
    wait_idle(server)


def wait_idle(server, timeout_s=60):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        s = server.stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=30)
        decode = [w for w in s.workers if w.role == "decode"]
        if s.live_leases == 0 and s.in_flight == 0 and all(w.running == w.waiting == 0 for w in decode) \
                and all(w.free_blocks == w.capacity_blocks for w in decode):
            return s
        time.sleep(0.5)
    raise AssertionError(f"the cluster did not go idle: {s}")


def test_200_concurrent_streams_all_end_and_no_lease_is_left(server):
    n, results, lock = 200, {}, threading.Lock()

    def one(i):
        req = gen(token_ids=pb.TokenIds(ids=[3 + (i * 7 + j) % 500 for j in range(20 + i % 40)]),
                  sampling={"max_tokens": 4, "ignore_eos": True}, request_id=f"load-{i}")
        tokens, outcome = 0, None
        try:
            for r in server.stub.Generate(req, timeout=240):
                tokens += len(r.token_ids)
                if r.finished:
                    outcome = ("ok", r.finish_reason, r.usage.completion_tokens == tokens == 4)
        except grpc.RpcError as e:
            outcome = ("status", e.code().name, e.details())
        with lock:
            results[i] = outcome

    t0 = time.time()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(results) == n and all(v is not None for v in results.values()), "a stream ended in silence"
    ok = [v for v in results.values() if v[0] == "ok"]
    assert all(v[2] for v in ok), "a completion with the wrong token count"
    statuses = {v[1] for v in results.values() if v[0] == "status"}
    assert statuses <= {"RESOURCE_EXHAUSTED"}, statuses  # early rejection is the only acceptable refusal
    assert len(ok) >= n // 2, f"only {len(ok)} of {n} completed in {time.time() - t0:.0f}s"
    print(f"load: {len(ok)} of {n} completed, {n - len(ok)} explicit statuses {statuses}, {time.time() - t0:.1f}s")
    wait_idle(server)
    still_serving(server)


def test_early_rejection_is_resource_exhausted_with_the_reason(server):
    with pytest.raises(grpc.RpcError) as e:
        list(server.stub.Generate(gen(slo=pb.SLOHints(ttft_ms=1e-6)), timeout=30))
    assert e.value.code() == C.RESOURCE_EXHAUSTED and "rejected: predicted TTFT" in e.value.details()
    # gRPC's retry pushback: the queue ahead is well under a second here, so the floor of 1 s
    assert dict(e.value.trailing_metadata())["grpc-retry-pushback-ms"] == "1000"
    wait_idle(server)
    still_serving(server)
