"""Hot-block replication: a prefix that many requests fetch from one node is copied to the others.

Mooncake replicates hot blocks so that the requests wanting a popular prefix (a system prompt, a
shared document) can run on any node without crossing the network each time. Here the Conductor
reports every cross-node fetch it placed or saw (a prefill worker pulling a prefix from another
node's store, a decode worker pulling its handoff from the prefill worker's node) to this policy.
Each block counts its fetches per source node; once the leading run of a fetched prefix has been
fetched ``threshold`` times from one node, the policy orders a copy of that run to every other
node with prefill workers that does not hold it yet (each copy at most once). The copy itself is
the stores' business (``StoreActor.replicate``: the target pulls the blocks through Ray's object
store, window-trimmed), and the Conductor counts it (``replicated_blocks``) once it has landed.
A plain object, so the simulator can run it too.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class Replicate:
    """Copy the prefix ``keys`` (``tokens`` tokens) from holder ``source`` to holder ``target``."""

    source: str
    target: str
    keys: tuple[int, ...]
    tokens: int


class HotBlockReplication:
    def __init__(self, threshold: int = 4, block_size: int = 64):
        if threshold < 1:
            raise ValueError(f"replication threshold must be >= 1, got {threshold}")
        self.threshold, self.block_size = threshold, block_size
        self.fetches: Counter[tuple[str, int]] = Counter()  # (source, key) -> cross-node fetches
        self.ordered: set[tuple[str, int]] = set()  # (target, last key) copies already ordered

    def fetched(self, source: str, keys: list[int], targets: list[str], holds) -> list[Replicate]:
        """``keys`` (a prefix, in order) were fetched from ``source``; ``targets`` are the holders a
        copy may go to and ``holds(target, keys) -> int`` says how many leading keys one already
        has. Returns the copies to make now."""
        for k in keys:
            self.fetches[(source, k)] += 1
        hot = 0
        while hot < len(keys) and self.fetches[(source, keys[hot])] >= self.threshold:
            hot += 1
        if hot == 0:
            return []
        run = tuple(keys[:hot])
        orders = []
        for target in targets:
            if target == source or (target, run[-1]) in self.ordered or holds(target, run) >= hot:
                continue
            self.ordered.add((target, run[-1]))
            orders.append(Replicate(source, target, run, hot * self.block_size))
        return orders

    def forget(self, holder: str) -> None:
        """A holder is gone (its node was lost): its counts and orders with it."""
        self.fetches = Counter({k: v for k, v in self.fetches.items() if k[0] != holder})
        self.ordered = {o for o in self.ordered if o[0] != holder}
