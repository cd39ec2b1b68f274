"""Model configuration: one transformer definition, described per layer.

A layer either *produces* K/V (its ``kv_source`` is itself) or reads the K/V of an
earlier producer of the same attention kind. A producer plus its consumers is a
*KV group*, the unit of every KV allocation, transfer and cache entry (design.md).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from typing import Literal

AttentionKind = Literal["global", "local"]
Precision = Literal["float32", "bfloat16"]

DEFAULT_WINDOW = 1024
DEFAULT_BLOCK_SIZE = 64


@dataclass(frozen=True)
class LayerSpec:
    attention: AttentionKind = "global"
    kv_source: int = -1  # -1 means "this layer" (filled in by ModelConfig)
    window: int | None = None  # tokens a local layer sees, itself included


@dataclass(frozen=True)
class QuantConfig:
    """What is held in int8. Everything off is the faithful reference path."""

    weights: bool = True  # per output channel, symmetric
    activations: bool = True  # per token, dynamic, symmetric
    kv: bool = True  # per token and KV head, float32 scale
    rotate: bool = True  # Hadamard-rotate each int8 linear's input (QuaRot): spreads outlier channels
    smooth_alpha: float | None = None  # SmoothQuant strength, applied where outlier channels remain; None = off
    compute: Precision = "float32"  # dtype of everything not held in int8

    @classmethod
    def off(cls, compute: Precision = "float32") -> "QuantConfig":
        return cls(weights=False, activations=False, kv=False, rotate=False, smooth_alpha=None, compute=compute)

    @property
    def any(self) -> bool:
        return self.weights or self.activations or self.kv

    @property
    def tag(self) -> str:
        if not self.any:
            return self.compute
        parts = [n for n, on in (("w8", self.weights), ("a8", self.activations), ("kv8", self.kv)) if on]
        return "-".join(parts)


@dataclass(frozen=True)
class KVGroup:
    """One KV-producing layer and the layers that read its K/V."""

    index: int
    producer: int
    layers: tuple[int, ...]
    attention: AttentionKind
    window: int | None

    def tokens_held(self, context: int) -> int:
        """Tokens of a ``context``-long sequence that a future step can still read."""
        return context if self.window is None else min(context, self.window)


@dataclass(frozen=True)
class ModelConfig:
    name: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    layers: tuple[LayerSpec, ...] = ()
    rope_theta: float = 10000.0  # global layers
    rope_theta_local: float | None = None  # local layers; None = same as global
    norm_eps: float = 1e-5
    max_seq_len: int = 8192
    tie_embeddings: bool = False
    quant: QuantConfig = field(default_factory=QuantConfig)
    block_size: int = DEFAULT_BLOCK_SIZE
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    weights: str | None = None  # where the weights come from; None = random or analytic

    def __post_init__(self) -> None:
        if not self.layers:
            object.__setattr__(self, "layers", tuple(LayerSpec() for _ in range(self.n_layers)))
        layers = tuple(
            dataclasses.replace(s, kv_source=i) if s.kv_source == -1 else s for i, s in enumerate(self.layers)
        )
        object.__setattr__(self, "layers", layers)
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"model config {self.name!r}: {msg}")

        for fname in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
                      "max_seq_len", "block_size"):
            if getattr(self, fname) <= 0:
                raise bad(f"{fname} must be positive, got {getattr(self, fname)}")
        if len(self.layers) != self.n_layers:
            raise bad(f"{len(self.layers)} layer specs for n_layers={self.n_layers}")
        if self.n_heads % self.n_kv_heads:
            raise bad(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        for i, spec in enumerate(self.layers):
            if spec.attention not in ("global", "local"):
                raise bad(f"layer {i}: attention must be 'global' or 'local', got {spec.attention!r}")
            if spec.attention == "local" and (spec.window is None or spec.window <= 0):
                raise bad(f"layer {i}: a local layer needs a positive window, got {spec.window}")
            if spec.attention == "global" and spec.window is not None:
                raise bad(f"layer {i}: a global layer has no window")
            src = spec.kv_source
            if not 0 <= src <= i:
                raise bad(f"layer {i}: kv_source={src} must name this layer or an earlier one")
            source = self.layers[src]
            if source.kv_source != src:
                raise bad(f"layer {i}: kv_source={src} does not produce KV itself")
            if (source.attention, source.window) != (spec.attention, spec.window):
                raise bad(f"layer {i}: shares KV with layer {src} of another attention kind or window")

    # -- derived ---------------------------------------------------------------------------
    def produces_kv(self, layer: int) -> bool:
        return self.layers[layer].kv_source == layer

    @functools.cached_property
    def kv_groups(self) -> tuple[KVGroup, ...]:
        groups = []
        for i, spec in enumerate(self.layers):
            if spec.kv_source == i:
                members = tuple(j for j, s in enumerate(self.layers) if s.kv_source == i)
                groups.append(KVGroup(len(groups), i, members, spec.attention, spec.window))
        return tuple(groups)

    def group_of_layer(self, layer: int) -> int:
        src = self.layers[layer].kv_source
        return next(g.index for g in self.kv_groups if g.producer == src)

    def rope_base(self, layer: int) -> float:
        if self.layers[layer].attention == "local" and self.rope_theta_local is not None:
            return self.rope_theta_local
        return self.rope_theta

    @property
    def kv_bytes_per_token_per_group(self) -> int:
        """K and V of one token in one group: int8 + a float32 scale per KV head, else 2/4-byte floats."""
        if self.quant.kv:
            return 2 * self.n_kv_heads * (self.head_dim + 4)
        width = 2 if self.quant.compute == "bfloat16" else 4
        return 2 * self.n_kv_heads * self.head_dim * width

    def kv_blocks(self, group: KVGroup, context: int) -> int:
        """Blocks a paged pool holds for ``group`` after ``context`` tokens: the ones a future step can read."""
        first = 0 if group.window is None else max(0, context - group.window)
        return 0 if context == 0 else (context - 1) // self.block_size - first // self.block_size + 1

    def kv_bytes(self, context: int) -> int:
        """KV bytes held for one sequence of ``context`` tokens, counted in whole blocks."""
        per_block = self.block_size * self.kv_bytes_per_token_per_group
        return sum(self.kv_blocks(g, context) for g in self.kv_groups) * per_block

    def kv_bytes_per_token(self, context: int) -> float:
        return self.kv_bytes(context) / context

    def with_quant(self, quant: QuantConfig) -> "ModelConfig":
        return dataclasses.replace(self, quant=quant)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        raw = json.loads(text)
        raw["layers"] = tuple(LayerSpec(**s) for s in raw["layers"])
        raw["quant"] = QuantConfig(**raw["quant"])
        return cls(**raw)


def shared_kv_layers(
    n_layers: int,
    local_per_global: int = 5,
    window: int = DEFAULT_WINDOW,
    local_share: int = 2,
    global_share: int = 1,
) -> tuple[LayerSpec, ...]:
    """The Character.AI layout: ``local_per_global`` sliding-window layers, then one global.

    Consecutive layers of one kind (in layer order, skipping the other kind) share KV in
    runs of ``local_share`` / ``global_share``: the first of each run produces, the rest read it.
    """
    period = local_per_global + 1
    kinds = ["global" if i % period == period - 1 else "local" for i in range(n_layers)]
    specs: list[LayerSpec] = []
    seen = {"local": 0, "global": 0}
    last_producer = {"local": -1, "global": -1}
    for i, kind in enumerate(kinds):
        share = local_share if kind == "local" else global_share
        if seen[kind] % share == 0:
            last_producer[kind] = i
        seen[kind] += 1
        specs.append(LayerSpec(kind, last_producer[kind], window if kind == "local" else None))
    return tuple(specs)
