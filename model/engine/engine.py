"""The engine the workers wrap: add requests, step, stream outputs, abort, export/import KV."""
from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from model.engine.block_pool import BlockPool, KVExport, Prefix, blocks_per_group
from model.engine.decode_graphs import DecodeGraphs
from model.engine.paged import PagedBatch, Segment
from model.engine.sampling import SamplingParams
from model.engine.scheduler import Scheduled, Scheduler
from model.engine.sequence import RequestOutput, Sequence, Status
from model.tokenizer import TextSoFar, Tokenizer
from model.transformer import Transformer


@dataclass(frozen=True)
class EngineConfig:
    kv_cache_bytes: int = 512 * 2**20  # split into blocks across the KV groups
    num_blocks: int | None = None  # blocks per group instead of a byte budget (tests: tiny pools)
    max_batched_tokens: int = 512  # tokens per step: decode tokens plus prefill chunks
    max_seqs: int = 64  # running sequences
    decode_graphs: str = "auto"  # "auto": CUDA graphs for decode steps on CUDA; "off"; "eager": the graphs'
    #                              padded static inputs run without capture (tests the path on CPU)

    def __post_init__(self) -> None:
        for name in ("kv_cache_bytes", "max_batched_tokens", "max_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"engine config: {name} must be positive, got {getattr(self, name)}")
        if self.decode_graphs not in ("auto", "off", "eager"):
            raise ValueError(f"engine config: decode_graphs must be 'auto', 'off' or 'eager', got {self.decode_graphs!r}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"engine config: num_blocks must be positive, got {self.num_blocks}")


class Engine:
    def __init__(self, model: Transformer, config: EngineConfig = EngineConfig(), tokenizer: Tokenizer | None = None):
        self.model = model
        self.mcfg = model.config
        self.config = config
        self.tokenizer = tokenizer
        counts = ([config.num_blocks] * len(self.mcfg.kv_groups) if config.num_blocks is not None else
                  blocks_per_group(self.mcfg, config.kv_cache_bytes, config.max_seqs, config.max_batched_tokens))
        self.device = next(iter(model.buffers()), torch.empty(0)).device
        self.pool = BlockPool(self.mcfg, counts, self.device)
        graphs = config.decode_graphs == "eager" or (config.decode_graphs == "auto" and self.device.type == "cuda")
        self.graphs = DecodeGraphs(model, self.pool, config.max_seqs, capture=config.decode_graphs == "auto") \
            if graphs else None
        self.scheduler = Scheduler(self.mcfg, self.pool, config.max_batched_tokens, config.max_seqs)
        self.sequences: dict[str, Sequence] = {}
        self._ids = itertools.count()
        eos = self.mcfg.eos_token_id if tokenizer is None else tokenizer.eos_token_id
        self.eos_ids = {eos} if eos is not None else set()

    # -- requests --------------------------------------------------------------------------------
    def add_request(self, prompt: list[int], params: SamplingParams = SamplingParams(), request_id: str | None = None,
                    prefix: Prefix | None = None, hold_kv: bool = False) -> str:
        """Queue a request; ``prefix`` supplies KV of the prompt's first tokens already in the pool."""
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.sequences:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self.check_request(prompt, params)
        seq = Sequence(request_id, list(prompt), params, [[] for _ in self.mcfg.kv_groups], hold_kv=hold_kv)
        if prefix is not None:
            self._adopt_prefix(seq, prefix)
        self.sequences[request_id] = seq
        self.scheduler.waiting.append(seq)
        return request_id

    def check_request(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise ValueError, naming what is wrong, for a request this engine could never run."""
        if not prompt:
            raise ValueError("prompt is empty: at least one token is needed")
        vocab = self.mcfg.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        if len(prompt) >= self.mcfg.max_seq_len:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in the model's context of "
                             f"{self.mcfg.max_seq_len} tokens")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; give stop_token_ids instead")
        total = min(len(prompt) + params.max_tokens, self.mcfg.max_seq_len)
        why = self.scheduler.fits_ever(total)
        if why:
            raise ValueError(f"request of up to {total} tokens can never fit the KV pool: {why}")

    def _adopt_prefix(self, seq: Sequence, prefix: Prefix) -> None:
        if len(prefix.tables) != len(self.mcfg.kv_groups):
            raise ValueError(f"prefix has {len(prefix.tables)} KV groups, the model {len(self.mcfg.kv_groups)}")
        usable = min(prefix.length, len(seq.prompt) - 1)  # at least one token runs, to give logits
        bs = self.pool.block_size
        for g in self.mcfg.kv_groups:
            first = 0 if g.window is None else max(0, usable - g.window + 1)
            table = prefix.tables[g.index]
            needed = range(first // bs, (usable - 1) // bs + 1) if usable else range(0)
            if any(i >= len(table) or table[i] < 0 for i in needed):
                raise ValueError(f"prefix lacks KV blocks of group {g.index} for positions {first}..{usable - 1}")
        for g, table in enumerate(prefix.tables):
            keep = (usable + bs - 1) // bs
            seq.tables[g] = list(table[:keep])
            for b in seq.tables[g]:
                if b >= 0:
                    self.pool.incref(g, b)
        seq.computed = seq.cached = usable

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is and free everything it holds; None if it is unknown or done."""
        seq = self.sequences.get(request_id)
        if seq is None:
            return None
        if seq.status is Status.RUNNING:
            self.scheduler.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.scheduler.waiting.remove(seq)
        seq.hold_kv = False
        if seq.status is not Status.FINISHED:
            seq.finish_reason = "abort"
            seq.status = Status.FINISHED
        self.scheduler.release_blocks(seq)
        del self.sequences[request_id]
        return self._output(seq, [], [])

    def release(self, request_id: str) -> None:
        """Free a finished ``hold_kv`` request's blocks."""
        self.abort(request_id)

    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    # -- stepping --------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        sampling = [i for i, s in enumerate(batch) if s.completes]
        if self.graphs is not None and all(s.n == 1 for s in batch) and self.graphs.bucket(len(batch)):
            seqs = [s.seq for s in batch]
            tokens = [q.token_slice(s.start, 1)[0] for q, s in zip(seqs, batch)]
            logits = self.graphs.run([(q.serial, q.layout) for q in seqs], tokens, [s.start for s in batch],
                                     [q.tables for q in seqs])
            logits = logits[sampling]
        else:
            tokens = torch.tensor([t for s in batch for t in s.seq.token_slice(s.start, s.n)], dtype=torch.long)
            paged = PagedBatch(self.pool, [Segment(s.seq.tables, s.start, s.n) for s in batch])
            ends = list(itertools.accumulate(s.n for s in batch))
            logits_at = torch.tensor([ends[i] - 1 for i in sampling], dtype=torch.long)
            logits = self.model(tokens.to(self.device), paged, logits_at=logits_at.to(self.device))
        greedy = self._greedy_tokens(logits, [batch[i].seq for i in sampling])
        outputs = []
        for s in batch:
            s.seq.computed = s.start + s.n
        for row, i in enumerate(sampling):
            outputs.append(self._advance(batch[i], logits[row], greedy[row]))
        return outputs

    def _greedy_tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int | None]:
        """Every greedy row's argmax in one call and one copy to the host (on a GPU, not a sync per row)."""
        if not any(s.params.greedy for s in seqs):
            return [None] * len(seqs)
        return logits.argmax(-1).tolist()

    def _advance(self, s: Scheduled, logits: torch.Tensor, greedy_token: int | None = None) -> RequestOutput:
        seq = s.seq
        if greedy_token is not None and seq.params.greedy:
            token = greedy_token
        else:  # the sampler's generator lives on the host
            token = seq.sampler.sample(logits if logits.device.type == "cpu" else logits.cpu())
        logprob = None
        if seq.params.logprobs:
            logprob = float(torch.log_softmax(logits.float(), -1)[token])
        stop = token in seq.params.stop_token_ids or (token in self.eos_ids and not seq.params.ignore_eos)
        new = [] if stop else [token]
        if not stop:
            seq.output.append(token)
            if logprob is not None:
                seq.logprobs.append(logprob)
        reason = "stop" if stop else None
        if reason is None and self.tokenizer is not None:
            if seq.detok is None:
                seq.detok = TextSoFar(self.tokenizer.decode)
            seq.text = seq.detok.add(seq.output[len(seq.detok.ids):])  # the last few tokens decoded, not all
            if seq.params.stop and self._cut_at_stop_string(seq):
                reason = "stop"
        if reason is None and (len(seq.output) >= seq.params.max_tokens or len(seq) >= self.mcfg.max_seq_len):
            reason = "length"
        if reason is not None:
            self._finish(seq, reason)
        return self._output(seq, new, [logprob] if (logprob is not None and new) else [])

    def _cut_at_stop_string(self, seq: Sequence) -> bool:
        hits = [i for i in (seq.text.find(s, max(0, seq.text_sent - len(s))) for s in seq.params.stop) if i >= 0]
        if hits:
            seq.text = seq.text[:min(hits)]
        return bool(hits)

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        self.scheduler.running.remove(seq)
        if not seq.hold_kv:
            self.scheduler.release_blocks(seq)
            del self.sequences[seq.request_id]

    def _output(self, seq: Sequence, new: list[int], logprobs: list[float]) -> RequestOutput:
        finished = seq.status is Status.FINISHED
        text = ""
        if self.tokenizer is not None:
            # hold back an unfinished UTF-8 character and anything that may start a stop string
            hold = 0 if finished else max([len(s) - 1 for s in seq.params.stop] + [0])
            upto = len(seq.text) - hold
            if not finished and seq.text.endswith("\ufffd"):
                upto = min(upto, len(seq.text) - 1)
            if upto > seq.text_sent:
                text, seq.text_sent = seq.text[seq.text_sent:upto], upto
        return RequestOutput(seq.request_id, new, text, logprobs if seq.params.logprobs else None, finished,
                             seq.finish_reason, len(seq.prompt), seq.cached, len(seq.output))

    # -- conveniences ----------------------------------------------------------------------------
    def stream(self) -> Iterator[RequestOutput]:
        """Step until every request is done, yielding outputs as they come."""
        while self.has_work():
            yield from self.step()

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] = SamplingParams()
                 ) -> list[list[int]]:
        """Run a batch to completion; the generated token ids of each prompt, in order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        out: dict[str, list[int]] = {i: [] for i in ids}
        for o in self.stream():
            out[o.request_id].extend(o.token_ids)
        return [out[i] for i in ids]

    # -- KV in and out (for the store) -------------------------------------------------------------
    def export_kv(self, request_id: str, start: int = 0, end: int | None = None) -> KVExport:
        """KV of positions [start, end) of a request, per group: local groups only what their window
        still needs at ``end`` (design invariant 3). ``start`` must sit on a block boundary. The last block's
        slots past ``end`` are zeros: they held whatever the pool's earlier user wrote there, so an export
        would carry another request's bytes and differ with the pool's history."""
        seq = self.sequences.get(request_id)
        if seq is None:
            raise KeyError(f"unknown request {request_id!r} (finished requests need hold_kv=True)")
        end = seq.computed if end is None else end
        bs = self.pool.block_size
        if start % bs or not 0 <= start < end <= seq.computed:
            raise ValueError(f"export range [{start}, {end}) must start on a block boundary and lie in "
                             f"the {seq.computed} computed tokens")
        out = KVExport(bs, start, end)
        for g in self.mcfg.kv_groups:
            first = start if g.window is None else max(start, end - g.window)
            lo, hi = first // bs, (end - 1) // bs + 1
            blocks = self.pool.read(g.index, seq.tables[g.index][lo:hi], lo)
            if end % bs:
                for arr in (blocks.k, blocks.v, blocks.k_scale, blocks.v_scale):
                    if arr is not None:
                        arr[-1, end % bs:] = 0
            out.groups.append(blocks)
        return out

    def import_kv(self, data: KVExport) -> Prefix:
        """Put exported blocks in this pool; the returned Prefix holds them until ``release_prefix``."""
        need = self.blocks_to_import(data)
        short = [g for g, n in enumerate(need) if n > self.pool.num_free(g)]
        if short:
            raise MemoryError(f"not enough free KV blocks to import into groups {short}")
        tables = []
        try:
            for g, blocks in enumerate(data.groups):
                ids = [self.pool.allocate(g) for _ in range(len(blocks.k))]
                tables.append([-1] * blocks.first_block + ids)
                self.pool.write(g, ids, blocks)
        except Exception:
            self.release_prefix(Prefix(data.end, tables))
            raise
        return Prefix(data.end, tables)

    def blocks_to_import(self, data: KVExport) -> list[int]:
        """The blocks per group that ``import_kv(data)`` takes; ValueError if this pool cannot take it."""
        if data.block_size != self.pool.block_size:
            raise ValueError(f"KV blocks of size {data.block_size} for a pool of block size {self.pool.block_size}")
        if data.start != 0:
            raise ValueError("only a prefix (start=0) can be imported as reusable KV")
        if len(data.groups) != len(self.mcfg.kv_groups):
            raise ValueError(f"KV export has {len(data.groups)} groups, the model {len(self.mcfg.kv_groups)}")
        return [len(blocks.k) for blocks in data.groups]

    def share_prefix(self, request_id: str, length: int | None = None) -> Prefix:
        """A Prefix over the first ``length`` computed tokens of a request, sharing its blocks in place."""
        seq = self.sequences.get(request_id)
        if seq is None:
            raise KeyError(f"unknown request {request_id!r} (finished requests need hold_kv=True)")
        length = seq.computed if length is None else length
        if not 0 < length <= seq.computed:
            raise ValueError(f"prefix length {length} must lie in [1, {seq.computed}]")
        keep = (length + self.pool.block_size - 1) // self.pool.block_size
        tables = [list(t[:keep]) for t in seq.tables]
        for g, table in enumerate(tables):
            for b in table:
                if b >= 0:
                    self.pool.incref(g, b)
        return Prefix(length, tables)

    def release_prefix(self, prefix: Prefix) -> None:
        for g, table in enumerate(prefix.tables):
            for b in table:
                if b >= 0:
                    self.pool.decref(g, b)
        prefix.tables = [[] for _ in prefix.tables]
