"""A small gRPC client of pdserve.v1, for the CLI (``chat``, ``generate``, ``status``, ``bench``)."""
from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from protos.pdserve.v1 import pdserve_pb2 as pb
from protos.pdserve.v1 import pdserve_pb2_grpc as pb_grpc


@dataclass
class Client:
    target: str
    token: str = ""
    ca_file: str = ""  # TLS when set
    channel: grpc.Channel = field(init=False)

    def __post_init__(self) -> None:
        if self.ca_file:
            with open(self.ca_file, "rb") as f:
                self.channel = grpc.secure_channel(self.target, grpc.ssl_channel_credentials(f.read()))
        else:
            self.channel = grpc.insecure_channel(self.target)
        self.stub = pb_grpc.PDServeStub(self.channel)

    @property
    def metadata(self) -> tuple:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def chat(self, messages: list[dict[str, str]], session_id: str = "", timeout: float = 300.0, **sampling):
        req = pb.ChatRequest(messages=[pb.ChatMessage(**m) for m in messages], session_id=session_id,
                             sampling=pb.SamplingParams(**sampling))
        return self.stub.Chat(req, timeout=timeout, metadata=self.metadata)

    def generate(self, prompt: str | list[int], session_id: str = "", timeout: float = 300.0, **sampling):
        kind = {"text": prompt} if isinstance(prompt, str) else {"token_ids": pb.TokenIds(ids=prompt)}
        req = pb.GenerateRequest(session_id=session_id, sampling=pb.SamplingParams(**sampling), **kind)
        return self.stub.Generate(req, timeout=timeout, metadata=self.metadata)

    def status(self, timeout: float = 30.0) -> pb.ClusterStatusResponse:
        return self.stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=timeout, metadata=self.metadata)

    def models(self, timeout: float = 30.0) -> pb.ListModelsResponse:
        return self.stub.ListModels(pb.ListModelsRequest(), timeout=timeout, metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()


def wait_serving(target: str, timeout_s: float, alive=lambda: True) -> bool:
    """Polls the standard health service until SERVING (or the time is up, or ``alive()`` is false)."""
    import time

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline and alive():
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    return False
