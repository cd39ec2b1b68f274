"""Mooncake-format request traces: one JSON object per line with ``timestamp`` (ms),
``input_length``, ``output_length`` and ``hash_ids`` (one id per 512-token block, equal ids
meaning equal prefixes). The store's index, the simulator and the benchmarks read them here."""
from __future__ import annotations

import json
from pathlib import Path

TRACE_BLOCK = 512


def load_trace(path: str | Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                r = json.loads(line)
                rows.append({"input_length": int(r["input_length"]), "hash_ids": list(r["hash_ids"]),
                             "timestamp": r.get("timestamp", 0), "output_length": int(r.get("output_length", 0))})
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a Mooncake trace line ({e})") from e
    return rows
