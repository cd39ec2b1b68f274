"""POST /v1/chat/completions and /v1/completions over the shared front door (``pdserve.frontdoor``).

A request is read (bounded by ``server.max_message_bytes``), shape-checked (``openai_schema``),
turned into the gRPC request message and validated by the same ``prepare`` as gRPC, admitted and
placed by the same ``open`` (the Conductor's early rejection is a 429 with Retry-After), and streamed
by the same ``events`` as Server-Sent Events or collected into one JSON body. A client that goes away
cancels its request in the cluster: streaming through Starlette's disconnect listener, non-streaming
through ``_unless_gone``; either way ``FrontDoor.close`` frees its slots, blocks and leases.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from pdserve import openai_schema as schema
from pdserve.frontdoor import Delta, Final, FrontDoor, Refused
from pdserve.validate import shown

STATUS = {"INVALID_ARGUMENT": (400, "invalid_request_error"), "NOT_FOUND": (404, "invalid_request_error"),
          "ALREADY_EXISTS": (409, "invalid_request_error"), "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
          "UNAUTHENTICATED": (401, "authentication_error"), "DEADLINE_EXCEEDED": (504, "timeout_error"),
          "UNAVAILABLE": (503, "service_unavailable_error"), "ABORTED": (500, "internal_error"),
          "INTERNAL": (500, "internal_error")}


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status,
                        headers=headers)


def refused_body(e: Refused, param: str | None = None) -> tuple[int, dict, dict]:
    status, type_ = STATUS.get(e.code, (500, "internal_error"))
    code = "model_not_found" if e.code == "NOT_FOUND" else "rejected" if e.rejected else e.code.lower()
    headers = {"Retry-After": str(e.retry_after())} if status == 429 else {}
    body = {"error": {"message": e.message, "type": type_, "param": param, "code": code}}
    return status, body, headers


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused past ``limit`` bytes before it is all read (Content-Length or streamed)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise Refused("RESOURCE_EXHAUSTED", f"body: {int(declared):,} bytes exceeds the limit of {limit:,}", "body")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refused("RESOURCE_EXHAUSTED", f"body: more than {limit:,} bytes", "body")
        chunks.append(chunk)
    return b"".join(chunks)


async def handle(request: Request, door: FrontDoor, chat: bool) -> Response:
    t0 = time.perf_counter()
    try:
        raw = await read_body(request, door.opts.max_message_bytes)
    except Refused as e:
        return error_response(413, e.message, param="body", code="request_too_large")
    header_session = request.headers.get("x-session-id")
    try:  # parsing, the schema's refusals and the shared validation: one trip off the event loop
        body, prepared = await door.call(_check, door, raw, chat, header_session)
    except schema.BadField as e:
        return error_response(400, str(e), param=e.field)
    except _Invalid as e:
        name = schema.openai_field(e.refused.field or "", e.body, header_session is not None)
        status, payload, _ = refused_body(Refused(e.refused.code, f"{name}: {e.refused.why}"), name)
        return JSONResponse(payload, status)
    if schema.wants_logprobs(body):
        prepared = dataclasses.replace(prepared, params=dataclasses.replace(prepared.params, logprobs=True))
    try:
        stream = await door.open(prepared, t0)
    except Refused as e:
        status, payload, headers = refused_body(e, e.field)
        return JSONResponse(payload, status, headers=headers)
    reply = Reply(door, chat, body, f"{'chatcmpl' if chat else 'cmpl'}-{stream.rid}", int(time.time()))
    if body.stream:
        return StreamingResponse(reply.sse(door.events(stream)), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(door.close, stream))
    try:
        result = await _unless_gone(request, reply.collect(door.events(stream)))
    finally:
        door.close(stream)
    if result is None:  # the client went away; nobody reads this
        return Response(status_code=499)
    return result


class _Invalid(Exception):
    """``pdserve.validate`` refused the request built from ``body``."""

    def __init__(self, body, refused: Refused):
        self.body, self.refused = body, refused


def _check(door: FrontDoor, raw: bytes, chat: bool, header_session: str | None):
    """(body, Prepared): the JSON parsed, turned into the gRPC request and validated as gRPC's is."""
    body = schema.parse(raw, chat)
    req = schema.to_request(body, header_session if header_session is not None else (body.user or ""))
    try:
        return body, door.check(req, chat)
    except Refused as e:
        raise _Invalid(body, e) from None


async def _unless_gone(request: Request, work):
    """Runs ``work`` unless the client disconnects first (then cancels it and returns None)."""
    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None
    return task.result()


@dataclasses.dataclass
class Reply:
    """Shapes the front door's events as OpenAI chat.completion(.chunk) or text_completion objects."""
    door: FrontDoor
    chat: bool
    body: object
    id: str
    created: int

    @property
    def object(self) -> str:
        return ("chat.completion" if self.chat else "text_completion")

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.door.limits.model}

    def _logprobs(self, deltas: list[Delta]) -> dict | None:
        if not schema.wants_logprobs(self.body):
            return None
        pairs = [(self.door.codec.decode([t]), lp) for d in deltas for t, lp in zip(d.token_ids, d.logprobs or [])]
        if self.chat:
            return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                                for t, lp in pairs]}
        offsets = [sum(len(t) for t, _ in pairs[:i]) for i in range(len(pairs))]
        return {"tokens": [t for t, _ in pairs], "token_logprobs": [lp for _, lp in pairs], "top_logprobs": None,
                "text_offset": offsets}

    def _choice(self, text: str, deltas: list[Delta], reason: str | None, streaming: bool) -> dict:
        lp = self._logprobs(deltas)
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": lp, "finish_reason": reason}
        key, msg = ("delta", {"content": text} if text or reason is None else {}) if streaming else \
            ("message", {"role": "assistant", "content": text})
        return {"index": 0, key: msg, "logprobs": lp, "finish_reason": reason}

    @staticmethod
    def usage(f: Final) -> dict:
        return {"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
                "total_tokens": f.prompt_tokens + f.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": f.cached_tokens}}

    async def collect(self, events) -> Response:
        deltas: list[Delta] = []
        async with contextlib.aclosing(events) as evs:
            try:
                async for e in evs:
                    if isinstance(e, Final):
                        text = "".join(d.text for d in deltas)
                        return JSONResponse({**self._head(self.object),
                                             "choices": [self._choice(text, deltas, _reason(e), False)],
                                             "usage": self.usage(e)})
                    deltas.append(e)
            except Refused as e:
                status, payload, headers = refused_body(e)
                return JSONResponse(payload, status, headers=headers)
        return error_response(500, "the stream ended without a final message", "internal_error")

    async def sse(self, events):
        """``data: {chunk}`` frames, ``data: [DONE]`` last; a failure mid-stream is an error frame."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        opts = getattr(self.body, "stream_options", None)
        usage = {"usage": None} if opts is not None and opts.include_usage else {}
        async with contextlib.aclosing(events) as evs:
            try:
                if self.chat:
                    first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}
                    yield _frame({**self._head(obj), "choices": [first], **usage})
                async for e in evs:
                    if isinstance(e, Final):
                        yield _frame({**self._head(obj), "choices": [self._choice("", [], _reason(e), True)], **usage})
                        if usage:
                            yield _frame({**self._head(obj), "choices": [], "usage": self.usage(e)})
                    elif e.text or e.logprobs:
                        yield _frame({**self._head(obj), "choices": [self._choice(e.text, [e], None, True)], **usage})
            except Refused as e:
                yield _frame(refused_body(e)[1])
        yield "data: [DONE]\n\n"


def _reason(f: Final) -> str:
    return f.reason if f.reason in ("length", "stop") else "stop"


def _frame(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def model_card(door: FrontDoor, created: int) -> dict:
    cfg = door.cluster.model_config
    return {"id": cfg.name, "object": "model", "created": created, "owned_by": "pdserve",
            "max_model_len": cfg.max_seq_len, "vocab_size": cfg.vocab_size, "block_size": cfg.block_size,
            "quant": cfg.quant.tag}


def unknown_model(name: str) -> JSONResponse:
    return error_response(404, f"model: unknown model {shown(name)}", param="model", code="model_not_found")
