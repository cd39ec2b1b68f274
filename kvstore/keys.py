"""Block keys (design invariant 1): one chained hash, used by the store, the workers and the simulator.

``key_i = xxh3_64(key_{i-1} as little-endian u64 || token ids as little-endian u32)``, with
``key_{-1}`` the model fingerprint, so caches of different weights, quantization or KV
layout never share a key. Never Python's ``hash()`` (salted per process).
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import numpy as np
import xxhash

U64 = (1 << 64) - 1


def chain_key(prev: int, tokens: Sequence[int]) -> int:
    return xxhash.xxh3_64_intdigest(prev.to_bytes(8, "little") + np.asarray(tokens, dtype="<u4").tobytes())


def block_keys(fingerprint: int, tokens: Sequence[int], block_size: int, partial: bool = False) -> list[int]:
    """Keys of the full blocks of ``tokens`` (and of the partial last block when ``partial``)."""
    keys, prev = [], fingerprint
    end = len(tokens) if partial else len(tokens) - len(tokens) % block_size
    for start in range(0, end, block_size):
        prev = chain_key(prev, tokens[start:start + block_size])
        keys.append(prev)
    return keys


def model_fingerprint(config_json: str, block_size: int, kv_tag: str, weights_digest: int = 0) -> int:
    """What makes KV reusable: the model (config and weights), its quantization and the KV layout."""
    text = json.dumps({"config": config_json, "block_size": block_size, "kv": kv_tag, "weights": weights_digest},
                      sort_keys=True)
    return xxhash.xxh3_64_intdigest(text.encode())


def fingerprint_of(model) -> int:
    """Fingerprint of a loaded ``model.transformer.Transformer``: config, every weight byte, KV layout."""
    import torch

    h = xxhash.xxh3_64()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    cfg = model.config
    return model_fingerprint(cfg.to_json(), cfg.block_size, "int8" if cfg.quant.kv else cfg.quant.compute,
                             h.intdigest())


def trace_block_keys(hash_ids: Iterable[int], fingerprint: int = 0) -> list[int]:
    """Mooncake traces give one id per 512-token block, equal ids meaning equal prefixes: chain them
    like token blocks (each id standing for its block's content) so the same index serves both."""
    keys, prev = [], fingerprint
    for h in hash_ids:
        prev = chain_key(prev, (int(h) & 0xFFFFFFFF,))
        keys.append(prev)
    return keys
