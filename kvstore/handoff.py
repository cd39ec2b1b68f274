"""What crosses between the prefill and decode workers: plain dataclasses (design invariant 7),
and the handshake that refuses to pair workers whose KV would not be interchangeable."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class WorkerInfo:
    name: str
    role: str  # "prefill" | "decode"
    block_size: int
    kv_dtype: str  # "int8", or the float dtype of a reference run
    fingerprint: int
    node: str = ""
    device: str = "cpu"  # where the worker computes: "cpu", "cuda:0" (its first visible GPU)
    gpu_ids: tuple[str, ...] = ()  # the GPUs Ray assigned it (shared ones too, under a fractional share)


def lease_owner(worker: str, request_id: str) -> str:
    """Whom the store records as owning the lease a prefill worker takes for a request's handoff: the driver can
    release it by this name when the worker dies after taking it but before its reply arrives."""
    return f"{worker}/{request_id}"


def handshake(a: WorkerInfo, b: WorkerInfo) -> None:
    """Raise unless ``a`` and ``b`` can hand KV to each other."""
    for field_name in ("block_size", "kv_dtype", "fingerprint"):
        x, y = getattr(a, field_name), getattr(b, field_name)
        if x != y:
            shown = (f"{x:#x}", f"{y:#x}") if field_name == "fingerprint" else (x, y)
            raise ValueError(f"workers {a.name!r} and {b.name!r} cannot be paired: {field_name} "
                             f"{shown[0]} != {shown[1]}")


@dataclass
class Handoff:
    """A prefilled request, ready for decode: its KV is in the store under ``keys``, leased."""

    request_id: str
    prompt: list[int]
    first_token: int | None  # None when the first sample ended the request (EOS / stop)
    finish_reason: str | None
    keys: list[int]
    kv_tokens: int  # tokens of the prompt whose KV the keys hold
    lease_id: str | None
    cached_tokens: int  # the prefix hit the prefill worker delivered
    timings: dict[str, float] = field(default_factory=dict)
    logprob: float | None = None
    recomputed_tokens: int = 0  # cached KV the prefill worker could not load and computed again
    remote_tokens: int = 0  # of ``cached_tokens``, those fetched from another node's store
    busy_s: float | None = None  # the prefill engine's busy seconds since its previous prompt (the Conductor's
    # measure of the worker's speed: paired with this prompt, not with whatever a load report happened to catch)
