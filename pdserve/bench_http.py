"""``pdserve bench --backend openai``: the same jobs as the gRPC bench, sent to the OpenAI HTTP edge
(``POST /v1/completions`` with token-id prompts, streamed as SSE, ``ignore_eos`` as vLLM's bench does),
so gRPC and HTTP are measured by one tool with one report.

The standard library's ``http.client`` with one keep-alive connection per bench thread: the client
adds as little as it can to what is measured. Timestamps are taken per SSE frame (a frame carries
one or more tokens' text); output tokens come from the final ``usage``.
"""
from __future__ import annotations

import http.client
import json
import ssl
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from pdserve.bench import Job, Result

CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 409: "ALREADY_EXISTS",
         413: "RESOURCE_EXHAUSTED", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE",
         504: "DEADLINE_EXCEEDED"}


@dataclass
class OpenAIClient:
    base_url: str  # http(s)://host:port
    token: str = ""
    ca_file: str = ""
    model: str = ""
    _local: threading.local = field(default_factory=threading.local, repr=False)

    @property
    def target(self) -> str:
        return self.base_url

    def _conn(self, timeout_s: float) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            u = urlsplit(self.base_url)
            if u.scheme == "https":
                ctx = ssl.create_default_context(cafile=self.ca_file or None)
                conn = http.client.HTTPSConnection(u.hostname, u.port, timeout=timeout_s, context=ctx)
            else:
                conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout_s)
            self._local.conn = conn
        conn.timeout = timeout_s
        return conn

    def _headers(self) -> dict:
        h = {"Content-Type": "application/json"}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        return h

    def models(self, timeout_s: float = 30.0) -> dict:
        """The served model's card (``id``, ``max_model_len``, ``vocab_size``, ...)."""
        conn = self._conn(timeout_s)
        conn.request("GET", "/v1/models", headers=self._headers())
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise ConnectionError(f"GET {self.base_url}/v1/models: HTTP {resp.status}")
        return json.loads(body)["data"][0]

    def run_job(self, job: Job, timeout_s: float) -> Result:
        body = {"model": self.model, "prompt": job.prompt, "max_tokens": job.max_tokens, "stream": True,
                "stream_options": {"include_usage": True}, "ignore_eos": True}
        if job.session:
            body["user"] = job.session
        r, times = Result(False, prompt=len(job.prompt)), []
        t0 = time.perf_counter()
        try:
            conn = self._conn(timeout_s)
            conn.request("POST", "/v1/completions", body=json.dumps(body), headers=self._headers())
            resp = conn.getresponse()
            if resp.status != 200:
                resp.read()
                r.code = CODES.get(resp.status, f"HTTP_{resp.status}")
            else:
                self._read_sse(resp, r, times)
        except (OSError, http.client.HTTPException, ValueError) as e:
            self._local.conn = None  # a broken connection is not reused
            r.code = "TIMEOUT" if isinstance(e, TimeoutError) else "CONNECTION"
        r.e2e = time.perf_counter() - t0
        r.ttft = times[0] - t0 if times else 0.0
        r.gaps = [b - a for a, b in zip(times, times[1:])]
        return r

    @staticmethod
    def _read_sse(resp, r: Result, times: list[float]) -> None:
        for line in resp:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                r.code = str(obj["error"].get("code") or "ERROR").upper()
                break
            if obj.get("choices") and obj["choices"][0].get("text"):
                times.append(time.perf_counter())
            if obj.get("usage"):
                r.ok = True
                r.output = obj["usage"]["completion_tokens"]
                r.cached = obj["usage"]["prompt_tokens_details"]["cached_tokens"]
        resp.read()  # the rest of the chunked body, so the connection can be reused
