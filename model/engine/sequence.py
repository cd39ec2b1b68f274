"""A request's life inside the engine: its tokens, its blocks, its text."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from model.engine.sampling import Sampler, SamplingParams
from model.tokenizer import TextSoFar


_SERIALS = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"  # not admitted yet, or preempted: holds no block
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestOutput:
    """What one step produced for one request; the last one has ``finished`` set."""

    request_id: str
    token_ids: list[int]
    text: str = ""
    logprobs: list[float] | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "abort", or "error: ..."
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came in as a prefix
    completion_tokens: int = 0


@dataclass
class Sequence:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    tables: list[list[int]]  # per KV group: logical block -> block id, -1 = not held
    hold_kv: bool = False  # keep the blocks after finishing, until Engine.release
    computed: int = 0  # leading tokens whose KV is in the pool
    cached: int = 0
    output: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    text: str = ""  # decoded output so far (with a tokenizer)
    text_sent: int = 0  # characters of ``text`` already streamed
    detok: TextSoFar | None = field(default=None, repr=False)  # ``text`` kept up to date token by token
    sampler: Sampler = field(init=False)
    serial: int = field(init=False, default_factory=lambda: next(_SERIALS))  # unique for the process's life
    layout: int = 0  # bumped whenever a block enters or leaves a table (not when a local window drops one):
    #                  with ``serial``, what tells the CUDA graphs' static tables that a row must be rewritten
    window_floor: dict[int, int] = field(default_factory=dict, repr=False)  # window -> below it, all entries -1

    def __post_init__(self) -> None:
        self.sampler = Sampler(self.params)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    def token_slice(self, start: int, n: int) -> list[int]:
        """``tokens[start:start + n]`` without building the whole list (a decode step needs one token)."""
        lp = len(self.prompt)
        if start >= lp:
            return self.output[start - lp:start - lp + n]
        if start + n <= lp:
            return self.prompt[start:start + n]
        return self.prompt[start:] + self.output[:start + n - lp]

    def __len__(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def pending(self) -> int:
        """Tokens still to run through the model before the next sample."""
        return len(self) - self.computed
