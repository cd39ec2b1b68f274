"""Decode steps replayed as CUDA graphs, one per batch bucket.

A decode step of a small model, or of a large one at a modest batch, is thousands of short kernel
launches: on a GPU the host, not the device, sets the pace (the H200 profile in BENCHMARKS.md: 30 ms
of device work behind 90 ms of host time). A graph captures the whole forward once per bucket of
batch sizes and replays it with one launch. What a replay reads lives in static buffers that each
step overwrites: token ids, positions, KV slots, sequence lengths and block tables padded to the
model's longest context. Rows past the real batch point at one scratch block per KV group, so their
writes land nowhere that matters and their logits are ignored.

``capture=False`` runs the same padded static forward eagerly: the CPU tests check that path gives
the eager engine's tokens, so only the capture itself is left to the GPU.
"""
from __future__ import annotations

import torch

from kernels import checks
from model.engine.block_pool import BlockPool
from model.engine.paged import PagedBatch, slot

BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512)


class DecodeGraphs:
    def __init__(self, model, pool: BlockPool, max_batch: int, capture: bool = True):
        self.model, self.pool = model, pool
        cfg = model.config
        self.block_size = cfg.block_size
        self.width = -(-cfg.max_seq_len // cfg.block_size)  # block-table width: the longest context
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.scratch = [pool.allocate(g.index) for g in cfg.kv_groups]  # padded rows write here
        self.capture = capture
        self.graphs: dict[int, tuple[object, dict, torch.Tensor]] = {}
        self._mempool = torch.cuda.graph_pool_handle() if capture else None

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def run(self, ids: list[object], tokens: list[int], positions: list[int], tables: list[list[list[int]]]
            ) -> torch.Tensor:
        """Logits [n, vocab] of ``n`` decode rows: ``tables[g][i]`` is row i's block table in group g, and
        ``ids[i]`` names that table's owner until its blocks are dropped (a preempted sequence gets a new id)."""
        n = len(tokens)
        b = self.bucket(n)
        if b not in self.graphs:
            self.graphs[b] = self._build(b)
        graph, static, logits = self.graphs[b]
        self._fill(static, ids, tokens, positions, tables)
        if graph is None:
            return self._forward(static)[:n]
        graph.replay()
        return logits[:n]

    # -- static buffers --------------------------------------------------------------------------------
    def _fill(self, static: dict, ids: list[object], tokens: list[int], positions: list[int],
              tables: list[list[list[int]]]) -> None:
        """Copy one step's inputs into the static buffers: the real rows, then the padding rows.

        A block table changes only when a block is appended or its last block is copied on write,
        and the kernels read no entry past a row's length, so a row is rewritten only when its
        request, length or last entry changed (rebuilding 128 x 512 entries per group each step
        would cost more than the step)."""
        b, n, bs = static["tokens"].shape[0], len(tokens), self.block_size
        pad = b - n
        host = {"tokens": tokens + [0] * pad, "positions": positions + [0] * pad,
                "lens": [p + 1 for p in positions] + [1] * pad}
        for name, values in host.items():
            static[name].copy_(torch.tensor(values, dtype=torch.long), non_blocking=True)
        for g, per_row in enumerate(tables):
            scratch, seen = self.scratch[g], static["rows"][g]
            keys = [(rid, len(t), t[-1]) for rid, t in zip(ids, per_row)] + [None] * pad
            changed = [i for i in range(b) if seen[i] != keys[i]]
            if changed:
                width = max(len(per_row[i]) if i < n else 1 for i in changed)
                rows = [per_row[i] + [-1] * (width - len(per_row[i])) if i < n else [scratch] + [-1] * (width - 1)
                        for i in changed]
                index = torch.tensor(changed, dtype=torch.long).to(static["tables"][g].device)
                static["tables"][g][:, :width].index_copy_(0, index, torch.tensor(rows, dtype=torch.long).to(index.device))
                for i in changed:
                    seen[i] = keys[i]
            slots = [slot(t, p, bs) for t, p in zip(per_row, positions)] + [scratch * bs] * pad
            static["slots"][g].copy_(torch.tensor(slots, dtype=torch.long), non_blocking=True)

    def _static(self, b: int) -> dict:
        dev = self.pool.device
        groups = len(self.scratch)
        static = {name: torch.zeros(b, dtype=torch.long, device=dev) for name in ("tokens", "positions")}
        static["lens"] = torch.ones(b, dtype=torch.long, device=dev)
        static["tables"] = [torch.full((b, self.width), -1, dtype=torch.long, device=dev) for _ in range(groups)]
        static["slots"] = [torch.full((b,), s * self.block_size, dtype=torch.long, device=dev) for s in self.scratch]
        for g, s in enumerate(self.scratch):
            static["tables"][g][:, 0] = s
        static["rows"] = [[None] * b for _ in range(groups)]  # what each row of the tables holds now
        return static

    def _forward(self, static: dict) -> torch.Tensor:
        paged = PagedBatch.for_decode(self.pool, static["positions"], static["slots"], static["lens"],
                                      static["tables"])
        with checks.suspended():
            return self.model(static["tokens"], paged, check_tokens=False)

    def _build(self, b: int):
        static = self._static(b)
        if not self.capture:
            return None, static, None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the capture: Triton compiles, allocator settles
            for _ in range(2):
                self._forward(static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._mempool):
            logits = self._forward(static)
        return graph, static, logits
