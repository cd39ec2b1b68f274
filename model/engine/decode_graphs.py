"""Decode steps replayed as CUDA graphs, one per batch bucket.

A decode step of a small model, or of a large one at a modest batch, is thousands of short kernel
launches: on a GPU the host, not the device, sets the pace (the H200 profile in BENCHMARKS.md: 30 ms
of device work behind 90 ms of host time). A graph captures the whole forward once per bucket of
batch sizes and replays it with one launch. What a replay reads lives in static buffers that each
step overwrites: token ids, positions and block tables padded to the model's longest context (the
KV slots and sequence lengths are computed from them inside the graph). Rows past the real batch point
at one scratch block per KV group, so their writes land nowhere that matters and their logits are ignored.

``capture=False`` runs the same padded static forward eagerly: the CPU tests check that path gives
the eager engine's tokens, so only the capture itself is left to the GPU.
"""
from __future__ import annotations

import torch

from kernels import checks
from model.engine.block_pool import BlockPool
from model.engine.paged import PagedBatch

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

    def run(self, keys: list[object], tokens: list[int], positions: list[int], tables: list[list[list[int]]]
            ) -> torch.Tensor:
        """Logits [n, vocab] of ``n`` decode rows: ``tables[i][g]`` is row i's block table in group g, and
        ``keys[i]`` changes whenever any of row i's tables gains or loses a block (``(serial, layout)``)."""
        n = len(tokens)
        b = self.bucket(n)
        if b not in self.graphs:
            self.graphs[b] = self._build(b)
        graph, static, logits = self.graphs[b]
        self._fill(static, keys, tokens, positions, tables)
        if graph is None:
            return self._forward(static)[:n]
        graph.replay()
        return logits[:n]

    # -- static buffers --------------------------------------------------------------------------------
    def _fill(self, static: dict, keys: list[object], tokens: list[int], positions: list[int],
              tables: list[list[list[int]]]) -> None:
        """Copy one step's inputs into the static buffers: tokens and positions in one copy, then the block
        tables of the rows whose key changed (the KV slots and lengths follow from these on the device).

        A block table changes only when a block is appended or copied on write (a local window's drops are
        never read: the kernels mask positions below the window), so a row's tables, in every group at once,
        are rewritten only when its key changes: a few rows a step. Rebuilding 128 x 512 entries per group
        each step would cost more than the step; checking every group's table per row each step cost ~5 ms
        of host time at batch 128 with 24 groups (``benchmarks/step_host.py``)."""
        b, n = static["inputs"].shape[1], len(tokens)
        pad = b - n
        static["inputs"].copy_(torch.tensor([tokens + [0] * pad, positions + [0] * pad], dtype=torch.long),
                               non_blocking=True)
        seen = static["rows"]
        changed = [i for i in range(n) if seen[i] != keys[i]] + [i for i in range(n, b) if seen[i] is not None]
        if not changed:
            return
        width = max(max(len(t) for t in tables[i]) if i < n else 1 for i in changed)
        rows = [[tables[i][g] + [-1] * (width - len(tables[i][g])) if i < n else [s] + [-1] * (width - 1)
                 for i in changed] for g, s in enumerate(self.scratch)]
        device = static["tables"].device
        index = torch.tensor(changed, dtype=torch.long).to(device)
        static["tables"][:, :, :width].index_copy_(1, index, torch.tensor(rows, dtype=torch.long).to(device))
        for i in changed:
            seen[i] = keys[i] if i < n else None

    def _static(self, b: int) -> dict:
        dev = self.pool.device
        inputs = torch.zeros(2, b, dtype=torch.long, device=dev)  # token ids, positions
        tables = torch.full((len(self.scratch), b, self.width), -1, dtype=torch.long, device=dev)
        tables[:, :, 0] = torch.tensor(self.scratch, dtype=torch.long, device=dev)[:, None]
        return {"inputs": inputs, "tables": tables, "rows": [None] * b}  # rows: the key each row holds now

    def _forward(self, static: dict) -> torch.Tensor:
        """The padded forward, captured whole: each row's KV slot in every group and its length are
        computed here from the static tables and positions (padding rows: position 0 of the scratch block)."""
        tokens, positions = static["inputs"]
        tables, bs = static["tables"], self.block_size
        held = tables.gather(2, (positions // bs).view(1, -1, 1).expand(tables.shape[0], -1, 1)).squeeze(2)
        slots = held * bs + positions % bs
        paged = PagedBatch.for_decode(self.pool, positions, list(slots.unbind(0)), positions + 1,
                                      list(tables.unbind(0)))
        with checks.suspended():
            return self.model(tokens, paged, check_tokens=False)

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
