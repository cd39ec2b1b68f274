"""What a client may read when a request fails: a status code name and a short message of our own
that says which part failed and what to do. Never a Ray class name, an actor id, a traceback or
terminal colour codes: those stay in the server's log."""
from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_RAY_WORDS = re.compile(r"ray|actor|traceback|0x[0-9a-f]{8,}|[0-9a-f]{24,}", re.I)


class ServeError(RuntimeError):
    """A request's failure as the client sees it: ``code`` names a grpc.StatusCode."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def short(text: str, limit: int = 300) -> str:
    """The first line of ``text`` without colour codes, at most ``limit`` characters."""
    line = _ANSI.sub("", str(text)).strip().splitlines()
    line = line[0] if line else ""
    return line if len(line) <= limit else line[:limit - 3] + "..."


def from_worker(error: BaseException, part: str) -> ServeError:
    """A worker method's failure: its own ValueError (a request the engine can never run) keeps
    its message; anything else becomes a generic message naming the part."""
    cause = getattr(error, "cause", None) or error  # RayTaskError wraps the worker's exception
    if isinstance(cause, ServeError):
        return cause
    if isinstance(cause, (ValueError, MemoryError)) and not isinstance(cause, KeyError):
        text = short(cause)
        if text and not _RAY_WORDS.search(text):
            return ServeError("INVALID_ARGUMENT", f"{part}: {text}")
    return ServeError("INTERNAL", f"{part} failed on this request; retry it, and see the server log if it "
                                  "happens again")


def client_message(error: BaseException) -> tuple[str, str]:
    """(status code name, message) for any exception that reaches the gateway."""
    if isinstance(error, ServeError):
        return error.code, error.message
    return "UNAVAILABLE", "the cluster failed on this request (an internal error); retry it, and see the server log"
