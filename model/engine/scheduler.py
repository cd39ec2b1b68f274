"""Which sequences run in the next step, and the blocks they need.

Each step fills a token budget: running sequences first (one token each when decoding, or
their next prefill chunk), then waiting ones in arrival order. Blocks are taken per KV
group before a sequence is scheduled; when the pool runs dry, the most recently admitted
running sequence is preempted (its blocks freed, recomputed later) rather than failing. Waiting
sequences can hold blocks too (KV given as a prefix): when nothing runs and the first waiting one
cannot start, one of those goes first or gives its blocks up, so the queue never stalls.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from model.config import ModelConfig
from model.engine.block_pool import BlockPool
from model.engine.sequence import Sequence, Status


@dataclass
class Scheduled:
    seq: Sequence
    start: int
    n: int

    @property
    def completes(self) -> bool:
        """Whether this chunk reaches the sequence's last token, so a new token is sampled."""
        return self.start + self.n == len(self.seq)


class Scheduler:
    def __init__(self, config: ModelConfig, pool: BlockPool, max_batched_tokens: int, max_seqs: int):
        self.config = config
        self.pool = pool
        self.max_batched_tokens = max_batched_tokens
        self.max_seqs = max_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self._local: dict[int, list[int]] = {}  # window -> its local groups
        for g in config.kv_groups:
            if g.window is not None:
                self._local.setdefault(g.window, []).append(g.index)

    def schedule(self) -> list[Scheduled]:
        budget = self.max_batched_tokens
        batch: list[Scheduled] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.pending, budget)
            while not self._reserve(seq, n):
                victim = next((s for s in reversed(self.running) if s is not seq and
                               all(b.seq is not s for b in batch)), None)
                if victim is None:
                    victim = seq
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                batch.append(Scheduled(seq, seq.computed, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            n = min(seq.pending, budget)
            if not self._reserve(seq, n):
                if self.running or not self._unstick(budget):
                    break
                continue
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append(Scheduled(seq, seq.computed, n))
            budget -= n
        return batch

    def preempt(self, seq: Sequence) -> None:
        """Free everything ``seq`` holds; it goes back to the front of the queue and is recomputed."""
        self._start_over(seq)
        seq.status = Status.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def _start_over(self, seq: Sequence) -> None:
        self.release_blocks(seq)
        seq.computed = 0
        seq.cached = 0
        self.preemptions += 1

    def _unstick(self, budget: int) -> bool:
        """Nothing runs and the first waiting sequence cannot get its blocks: those it lacks are held by
        waiting sequences behind it (KV they were given as a prefix), and nothing would ever free them.
        The first of those that can take its next chunk goes to the front; failing that, the last one
        gives its blocks up (it is recomputed). False if no waiting sequence behind the first holds any."""
        holders = [s for s in list(self.waiting)[1:] if any(b >= 0 for t in s.tables for b in t)]
        for seq in holders:
            if self._reserve(seq, min(seq.pending, budget)):
                self.waiting.remove(seq)
                self.waiting.appendleft(seq)
                return True
        if holders:
            self._start_over(holders[-1])
        return bool(holders)

    def release_blocks(self, seq: Sequence) -> None:
        for g, table in enumerate(seq.tables):
            for b in table:
                if b >= 0:
                    self.pool.decref(g, b)
            table.clear()
        seq.layout += 1
        seq.window_floor.clear()

    def fits_ever(self, total_tokens: int) -> str | None:
        """Why a sequence of ``total_tokens`` could never be held, or None."""
        for g in self.config.kv_groups:
            need = self.config.kv_blocks(g, total_tokens)
            if g.window is not None:  # a prefill chunk is written whole before its head leaves the window
                need += self.max_batched_tokens // self.pool.block_size + 1
            need = min(need, -(-total_tokens // self.pool.block_size))
            if need > self.pool.capacity[g.index]:
                return (f"needs {need} KV blocks in group {g.index} but the pool holds "
                        f"{self.pool.capacity[g.index]}")
        return None

    # -- blocks ----------------------------------------------------------------------------------
    def _reserve(self, seq: Sequence, n: int) -> bool:
        """Make positions [computed, computed+n) writable in every group, or change nothing."""
        start, end = seq.computed, seq.computed + n
        self._drop_out_of_window(seq, start)
        bs = self.pool.block_size
        first, last = start // bs, (end - 1) // bs
        if first == last and self._held_alone(seq, first):
            return True  # a decode step inside a held, unshared block in every group: most steps
        plans = []
        for g in self.config.kv_groups:
            table = seq.tables[g.index]
            fresh = [i for i in range(first, last + 1)
                     if i >= len(table) or table[i] < 0 or self.pool.shared(g.index, table[i])]
            if len(fresh) > self.pool.num_free(g.index):
                return False
            plans.append((g.index, fresh))
        for g, fresh in plans:
            table = seq.tables[g]
            for i in fresh:
                if i >= len(table):
                    table.extend([-1] * (i + 1 - len(table)))
                new = self.pool.allocate(g)
                if table[i] >= 0:  # copy-on-write of a shared, partially filled block
                    self.pool.copy_block(g, table[i], new)
                    self.pool.decref(g, table[i])
                table[i] = new
        if any(fresh for _, fresh in plans):
            seq.layout += 1
        return True

    def _held_alone(self, seq: Sequence, i: int) -> bool:
        """Whether block ``i`` of every table is held by this sequence alone (a plain loop: per step and
        sequence, this is the scheduler's hottest code)."""
        for table, refs in zip(seq.tables, self.pool.refs):
            if i >= len(table):
                return False
            b = table[i]
            if b < 0 or refs[b] != 1:
                return False
        return True

    def _drop_out_of_window(self, seq: Sequence, next_pos: int) -> None:
        """Local groups free the blocks that no query from ``next_pos`` on can read.

        Per window, the first block still needed (the floor) only moves up, one block every block_size
        steps: the last floor applied is kept on the sequence (``window_floor``, cleared with its blocks),
        so most steps check one number per window, not every group's table. When the floor moves, each
        group walks down from it and stops at the first block already dropped: every call leaves all
        entries below its floor at -1, so what is left to free is the run just below the window (one
        block, or a new table's whole out-of-window prefix). A step's reservations at batch 128 / 8k with
        24 groups (``benchmarks/reserve_host.py``, same pool): 17.1 ms scanning every table from block 0
        (585d1fb), 4.7 ms walking down each group's table every step (017ba78), 1.2 ms now; the GPU's
        graph steps wait on this host time (``benchmarks/step_host.py``)."""
        bs = self.pool.block_size
        for window, groups in self._local.items():
            floor = max(0, next_pos - window + 1) // bs
            if floor <= seq.window_floor.get(window, 0):
                continue
            seq.window_floor[window] = floor
            for g in groups:
                table = seq.tables[g]
                i = min(floor, len(table)) - 1
                while i >= 0 and table[i] >= 0:
                    self.pool.decref(g, table[i])
                    table[i] = -1
                    i -= 1
