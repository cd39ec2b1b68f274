"""The gateway's edges without Ray: config errors, refusing exposed binds, bearer-token auth,
stop strings. A fake cluster stands in for LocalCluster (same submit/stream/cancel/status calls)."""
import asyncio
from concurrent.futures import Future
from types import SimpleNamespace

import grpc
import pytest

from model.engine import RequestOutput
from model.presets import get_preset
from pdserve.config import ConfigError, load_config, parse
from pdserve.gateway import ServerOptions, StopMatcher, check_exposure, start
from pdserve.metrics import Metrics
from protos.pdserve.v1 import pdserve_pb2 as pb
from protos.pdserve.v1 import pdserve_pb2_grpc as pb_grpc


class FakeCluster:
    def __init__(self):
        self.model_config, self.tokenizer, self.cancelled = get_preset("skv-tiny"), None, []

    def submit(self, prompt, params, session_id, rid, ttft, tbt, priority):
        done = Future()
        done.set_result(SimpleNamespace(cached_tokens=0, timings={}))
        return SimpleNamespace(request_id=rid, handoff=done, n=params.max_tokens)

    def stream(self, sub):
        for i in range(sub.n):
            yield RequestOutput(sub.request_id, [40 + i], finished=i == sub.n - 1, finish_reason="length")

    def cancel(self, rid):
        self.cancelled.append(rid)

    def status(self):
        return {}


@pytest.mark.parametrize("raw, message", [
    ({"clusterr": {}}, "unknown config section [clusterr]"),
    ({"cluster": {"n_prefil": 1}}, "unknown config key cluster.n_prefil"),
    ({"cluster": {"n_prefill": "2"}}, "config key cluster.n_prefill must be int"),
    ({"cluster": {"n_decode": 0}}, "config key cluster.n_decode must be > 0"),
    ({"server": {"tls_cert": "a.pem"}}, "server.tls_cert and server.tls_key go together"),
    ({"store": {"disk_capacity_blocks": 10}}, "store.disk_dir"),
])
def test_config_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        parse(raw)


def test_config_file_toml(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[cluster]\nmodel = "skv-tiny"\nn_decode = 2\n[slo]\ntbt_ms = 250\n')
    cfg = load_config(f)
    assert (cfg.cluster.model, cfg.cluster.n_decode, cfg.slo.tbt_ms, cfg.server.host) == ("skv-tiny", 2, 250.0, "127.0.0.1")
    f.write_text("[cluster\n")
    with pytest.raises(ConfigError, match="c.toml"):
        load_config(f)


def test_non_loopback_bind_needs_tls_and_token():
    check_exposure(ServerOptions(host="127.0.0.1"))
    check_exposure(ServerOptions(host="::1"))
    for opts in (ServerOptions(host="0.0.0.0"), ServerOptions(host="10.1.2.3", auth_token="t"),
                 ServerOptions(host="0.0.0.0", tls_cert="c", tls_key="k")):
        with pytest.raises(ValueError, match="refusing to bind"):
            check_exposure(opts)
    check_exposure(ServerOptions(host="0.0.0.0", tls_cert="c", tls_key="k", auth_token="t"))


def test_up_refuses_an_exposed_address_before_starting_anything(tmp_path):
    from test_cli import run

    (tmp_path / "c.toml").write_text('[server]\nhost = "0.0.0.0"\n')
    out = run("up", "--config", str(tmp_path / "c.toml"), "--state-file", str(tmp_path / "s.json"), timeout=60)
    assert out.returncode == 2 and "refusing to bind 0.0.0.0" in out.stderr
    assert not (tmp_path / "s.json").exists()


def test_stop_matcher_cuts_before_the_stop_string_across_deltas():
    m = StopMatcher(("END",))
    assert m.feed("abcE") == ("ab", False)
    assert m.feed("N") == ("c", False)  # "EN" may still become "END": held back
    assert m.feed("Dxyz") == ("", True)
    m = StopMatcher(("END",))
    assert m.feed("abEN") == ("ab", False) and m.feed("x") == ("E", False) and m.flush() == "Nx"


def test_bearer_token_auth_and_stop_strings_in_process():
    async def main():
        cluster = FakeCluster()
        running = await start(cluster, ServerOptions(auth_token="s3cret"), Metrics("skv-tiny"))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
                stub = pb_grpc.PDServeStub(ch)
                req = pb.GenerateRequest(text="hello", sampling=pb.SamplingParams(max_tokens=6))
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    [r async for r in stub.Generate(req, timeout=10)]
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                md = (("authorization", "Bearer s3cret"),)
                out = [r async for r in stub.Generate(req, timeout=10, metadata=md)]
                assert "".join(r.text for r in out) == "".join(chr(37 + i) for i in range(6))
                assert out[-1].finish_reason == "length" and out[-1].usage.completion_tokens == 6
                req.sampling.stop.append("'")  # chr(39): the third token
                out = [r async for r in stub.Generate(req, timeout=10, metadata=md)]
                assert "".join(r.text for r in out) == "%&" and out[-1].finish_reason == "stop"
                assert cluster.cancelled == [out[-1].request_id]  # the rest of it freed in the cluster
        finally:
            await running.stop(0)

    asyncio.run(main())


def test_tls_with_a_self_signed_certificate(tmp_path):
    from gateway_server import self_signed_cert

    key, cert = self_signed_cert(tmp_path)

    async def main():
        running = await start(FakeCluster(), ServerOptions(tls_cert=str(cert), tls_key=str(key), auth_token="t"),
                              Metrics("skv-tiny"))
        try:
            creds = grpc.ssl_channel_credentials(cert.read_bytes())
            async with grpc.aio.secure_channel(f"127.0.0.1:{running.port}", creds) as ch:
                stub = pb_grpc.PDServeStub(ch)
                [m] = (await stub.ListModels(pb.ListModelsRequest(), timeout=10,
                                             metadata=(("authorization", "Bearer t"),))).models
                assert m.name == "skv-tiny"
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:  # plaintext is refused
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await pb_grpc.PDServeStub(ch).ListModels(pb.ListModelsRequest(), timeout=5)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await running.stop(0)

    asyncio.run(main())
