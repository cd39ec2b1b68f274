"""OpenAI request bodies -> the gRPC request messages that ``pdserve.validate`` checks.

The HTTP edge validates through the very code the gRPC gateway uses: pydantic checks the JSON's shape
and types (unknown fields are refused by name), this module refuses what pdserve does not do (n > 1,
penalties, tools, ...), builds a ``GenerateRequest`` / ``ChatRequest``, and the front door's
``prepare`` does the rest. Field names in errors are the OpenAI ones (``max_tokens``, not
``sampling.max_tokens``).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from pdserve.validate import shown
from protos.pdserve.v1 import pdserve_pb2 as pb

UINT32, INT64 = 2**32, 2**63


class BadField(ValueError):
    """A request field pdserve refuses; ``field`` is its OpenAI name."""

    def __init__(self, field: str, why: str):
        super().__init__(f"{field}: {why}")
        self.field, self.why = field, why


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class SLO(_Body):
    ttft_ms: float | None = None
    tbt_ms: float | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None  # accepted, not used


class _Common(_Body):
    model: str = ""
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    stop: str | list[str] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    user: str | None = None  # the session, when no x-session-id header is given
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # extensions, as vLLM's: pass them with the openai client's extra_body
    top_k: int | None = None
    ignore_eos: bool = False
    priority: int = 0
    slo: SLO | None = None


class ChatBody(_Common):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class CompletionBody(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


def parse(raw: bytes, chat: bool) -> ChatBody | CompletionBody:
    """The JSON body, shape- and type-checked; ``BadField`` names the first field at fault."""
    cls = ChatBody if chat else CompletionBody
    try:
        return cls.model_validate_json(raw)
    except ValidationError as e:
        err = e.errors(include_url=False, include_input=False)[0]
        where = _loc(err.get("loc", ()))
        if err.get("type") == "json_invalid":
            raise BadField("body", "is not valid JSON") from None
        if err.get("type") == "extra_forbidden":
            raise BadField(where, "is not supported by this server") from None
        if err.get("type") == "missing":
            raise BadField(where, "is required") from None
        raise BadField(where or "body", err.get("msg", "is invalid")[:120]) from None


def _loc(loc: tuple) -> str:
    """('messages', 0, 'content', 'str') -> 'messages[0].content' (pydantic's union tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier() and part not in ("str", "int", "float", "bool", "list", "dict", "none"):
            out += ("." if out else "") + part
    return out


def refuse_unsupported(b: ChatBody | CompletionBody) -> None:
    """What the schema accepts but pdserve does not do, refused by name."""
    if b.n != 1:
        raise BadField("n", f"{b.n}: only n = 1 is supported")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(b, name) != 0:
            raise BadField(name, "only 0 is supported")
    if b.logit_bias:
        raise BadField("logit_bias", "is not supported")
    if b.stream_options is not None and not b.stream:
        raise BadField("stream_options", "is only allowed with stream = true")
    if isinstance(b, ChatBody):
        if b.top_logprobs:
            raise BadField("top_logprobs", "only 0: the engine returns the chosen token's log-probability alone")
        if b.max_tokens is not None and b.max_completion_tokens is not None:
            raise BadField("max_completion_tokens", "give max_tokens or max_completion_tokens, not both")
    else:
        if b.logprobs:
            raise BadField("logprobs", f"{b.logprobs}: only 0 (the chosen token's log-probability) is supported")
        if b.echo:
            raise BadField("echo", "is not supported")
        if b.suffix:
            raise BadField("suffix", "is not supported")
        if b.best_of not in (None, 1):
            raise BadField("best_of", "only 1 is supported")


def wants_logprobs(b: ChatBody | CompletionBody) -> bool:
    return bool(b.logprobs) if isinstance(b, ChatBody) else b.logprobs is not None


def to_request(b: ChatBody | CompletionBody, session: str) -> pb.GenerateRequest | pb.ChatRequest:
    """The gRPC request the gateway would get for this body (validated next by ``pdserve.validate``)."""
    refuse_unsupported(b)
    common = dict(model=b.model, session_id=session, sampling=_sampling(b), priority=_ranged("priority", b.priority,
                                                                                            -2**31, 2**31))
    if b.slo is not None:
        common["slo"] = pb.SLOHints(**{k: v for k, v in b.slo.model_dump().items() if v is not None})
    if isinstance(b, ChatBody):
        return pb.ChatRequest(messages=[_message(i, m) for i, m in enumerate(b.messages)], **common)
    return pb.GenerateRequest(**_prompt(b.prompt), **common)


def _sampling(b: ChatBody | CompletionBody) -> pb.SamplingParams:
    s = pb.SamplingParams(ignore_eos=b.ignore_eos)
    max_tokens, name = b.max_tokens, "max_tokens"
    if isinstance(b, ChatBody) and b.max_completion_tokens is not None:
        max_tokens, name = b.max_completion_tokens, "max_completion_tokens"
    if max_tokens is not None:
        s.max_tokens = _ranged(name, max_tokens, 0, UINT32)
    if b.top_k is not None:
        s.top_k = _ranged("top_k", b.top_k, 0, UINT32)
    if b.seed is not None:
        s.seed = _ranged("seed", b.seed, 0, INT64)
    for key in ("temperature", "top_p"):
        if getattr(b, key) is not None:
            setattr(s, key, getattr(b, key))
    stop = [b.stop] if isinstance(b.stop, str) else (b.stop or [])
    s.stop.extend(stop)
    return s


def _ranged(name: str, v: int, lo: int, hi: int) -> int:
    if not lo <= v < hi:
        raise BadField(name, f"{v} is out of range")
    return v


def _message(i: int, m: Message) -> pb.ChatMessage:
    if isinstance(m.content, list):
        content = "".join(p.text for p in m.content)
    else:
        content = m.content or ""
    role = "system" if m.role == "developer" else m.role  # OpenAI's newer name for the system role
    return pb.ChatMessage(role=role, content=content)


def _prompt(prompt) -> dict:
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise BadField("prompt", f"{len(prompt)} prompts: one prompt per request is supported")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return {"text": prompt}
    bad = next((t for t in prompt if not 0 <= t < UINT32), None)
    if bad is not None:
        raise BadField("prompt", f"token id {shown(str(bad))} is out of range")
    return {"token_ids": pb.TokenIds(ids=prompt)}


FIELD_NAMES = {"sampling.max_tokens": "max_tokens", "sampling.temperature": "temperature", "sampling.top_p": "top_p",
               "sampling.top_k": "top_k", "sampling.seed": "seed", "sampling.stop": "stop", "sampling": "body",
               "text": "prompt", "token_ids": "prompt", "session_id": "user"}


def openai_field(field: str, body: ChatBody | CompletionBody, header_session: bool) -> str:
    """A ``pdserve.validate`` field name as the OpenAI body spells it."""
    if field == "session_id" and header_session:
        return "x-session-id"
    if field == "sampling.max_tokens" and isinstance(body, ChatBody) and body.max_completion_tokens is not None:
        return "max_completion_tokens"
    return FIELD_NAMES.get(field, field)
