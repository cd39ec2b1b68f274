"""gRPC request messages -> plain, validated requests for the cluster (design invariant 7: the
protobuf types stop here). Every error names the field, so the gateway can answer
INVALID_ARGUMENT (or NOT_FOUND for an unknown model) with a message a client can act on."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from model.engine import SamplingParams
from pdserve.textcodec import ROLES, Codec

_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def shown(value: str, limit: int = 64) -> str:
    """A client's string as our messages echo it: quoted, cut to ``limit`` characters with its length
    said, so a huge value cannot swell a status message past gRPC's metadata limit."""
    return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value):,} characters)"


class FieldError(ValueError):
    def __init__(self, field: str, why: str, not_found: bool = False):
        super().__init__(f"{field}: {why}")
        self.field, self.why, self.not_found = field, why, not_found


@dataclass(frozen=True)
class Limits:
    model: str
    vocab_size: int
    max_seq_len: int
    max_prompt_tokens: int  # 0 = max_seq_len - 1
    max_tokens_limit: int = 4096
    max_stop: int = 16

    @property
    def prompt_cap(self) -> int:
        return min(self.max_prompt_tokens or self.max_seq_len - 1, self.max_seq_len - 1)


@dataclass(frozen=True)
class Prepared:
    prompt: list[int]
    params: SamplingParams  # stop strings are matched by the gateway, on the text it streams
    stop: tuple[str, ...]
    session_id: str | None
    request_id: str | None
    ttft_s: float | None
    tbt_s: float | None
    priority: int


def prepare(req, limits: Limits, codec: Codec, chat: bool) -> Prepared:
    """A GenerateRequest or ChatRequest -> Prepared, or FieldError."""
    if req.model and req.model != limits.model:
        raise FieldError("model", f"unknown model {shown(req.model)}; this server serves {limits.model!r}", not_found=True)
    _refuse_text_past_the_cap(req, codec, limits, chat)
    prompt = _chat_prompt(req, codec) if chat else _prompt(req, codec)
    if len(prompt) > limits.prompt_cap:
        raise FieldError("prompt", f"{len(prompt)} tokens exceeds the limit of {limits.prompt_cap}")
    bad = next((t for t in prompt if t >= limits.vocab_size), None)
    if bad is not None:
        raise FieldError("token_ids", f"token id {bad} is outside the vocabulary (size {limits.vocab_size})")
    params, stop = _sampling(req.sampling, limits, len(prompt), codec.eos_token_id)
    ttft, tbt = (_slo(req.slo, name) for name in ("ttft_ms", "tbt_ms"))
    if not -100 <= req.priority <= 100:
        raise FieldError("priority", f"{req.priority} is outside [-100, 100]")
    if len(req.session_id) > 256:
        raise FieldError("session_id", "longer than 256 characters")
    if req.request_id and not _ID.match(req.request_id):
        raise FieldError("request_id", "must be 1-128 characters of [A-Za-z0-9._:-]")
    return Prepared(prompt, params, stop, req.session_id or None, req.request_id or None, ttft, tbt, req.priority)


def _refuse_text_past_the_cap(req, codec: Codec, limits: Limits, chat: bool) -> None:
    """Refuses, before tokenizing it, text too long to fit the prompt cap whatever it encodes to: no
    token spans more than ``codec.max_token_bytes`` bytes, so the count has a floor. Tokenizing holds
    the GIL (a 4 MB prompt took seconds), so the gateway's event loop must not be handed huge text."""
    if chat:
        field, size = "messages", sum(len(m.content.encode()) for m in req.messages)
    elif req.WhichOneof("prompt") == "text":
        field, size = "text", len(req.text.encode())
    else:
        return
    floor = -(-size // codec.max_token_bytes)
    if floor > limits.prompt_cap:
        raise FieldError(field, f"{size:,} bytes of text are at least {floor:,} tokens, past the limit of "
                                f"{limits.prompt_cap} prompt tokens")


def _prompt(req, codec: Codec) -> list[int]:
    kind = req.WhichOneof("prompt")
    if kind is None:
        raise FieldError("prompt", "give text or token_ids")
    if kind == "text":
        if not req.text:
            raise FieldError("text", "empty prompt")
        return codec.encode(req.text)
    if not req.token_ids.ids:
        raise FieldError("token_ids", "empty prompt")
    return list(req.token_ids.ids)


def _chat_prompt(req, codec: Codec) -> list[int]:
    if not req.messages:
        raise FieldError("messages", "at least one message is needed")
    if not codec.has_chat_template:
        raise FieldError("model", "this model has no chat template: use Generate")
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            raise FieldError(f"messages[{i}].role", f"{shown(m.role)} is not one of {', '.join(ROLES)}")
    return codec.encode_chat([{"role": m.role, "content": m.content} for m in req.messages])


def _sampling(s, limits: Limits, n_prompt: int, eos: int | None) -> tuple[SamplingParams, tuple[str, ...]]:
    max_tokens = s.max_tokens if s.HasField("max_tokens") else min(128, limits.max_seq_len - n_prompt)
    if max_tokens < 1 or max_tokens > limits.max_tokens_limit:
        raise FieldError("sampling.max_tokens", f"{max_tokens} is outside [1, {limits.max_tokens_limit}]")
    if n_prompt + max_tokens > limits.max_seq_len:
        raise FieldError("sampling.max_tokens", f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds "
                                                f"the model's context of {limits.max_seq_len}")
    temperature = s.temperature if s.HasField("temperature") else 0.0
    if not math.isfinite(temperature) or temperature < 0 or temperature > 100:
        raise FieldError("sampling.temperature", f"{temperature} is outside [0, 100]")
    top_p = s.top_p if s.HasField("top_p") else 1.0
    if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
        raise FieldError("sampling.top_p", f"{top_p} is outside (0, 1]")
    top_k = s.top_k if s.HasField("top_k") else 0
    if top_k > limits.vocab_size:
        raise FieldError("sampling.top_k", f"{top_k} exceeds the vocabulary size {limits.vocab_size}")
    seed = s.seed if s.HasField("seed") else None
    if seed is not None and not 0 <= seed < 2**63:
        raise FieldError("sampling.seed", f"{seed} must be >= 0")
    stop = tuple(s.stop)
    if len(stop) > limits.max_stop or any(not x or len(x) > 256 for x in stop):
        raise FieldError("sampling.stop", f"at most {limits.max_stop} non-empty strings of up to 256 characters")
    eos_ids = (eos,) if eos is not None and not s.ignore_eos else ()
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                stop_token_ids=eos_ids, ignore_eos=s.ignore_eos)
    except ValueError as e:  # a backstop: the checks above should have named it already
        raise FieldError("sampling", str(e)) from None
    return params, stop


def _slo(slo, name: str) -> float | None:
    if not slo.HasField(name):
        return None
    v = getattr(slo, name)
    if not math.isfinite(v) or v <= 0 or v > 3.6e6:
        raise FieldError(f"slo.{name}", f"{v} must be a positive number of milliseconds (at most an hour)")
    return v / 1000.0
