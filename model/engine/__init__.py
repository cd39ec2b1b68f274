"""The paged engine: block pools per KV group, continuous batching, chunked prefill, sampling.

The prefill and decode workers are thin shells around one ``Engine``.
"""
from model.engine.block_pool import BlockPool, KVExport, Prefix
from model.engine.engine import Engine, EngineConfig
from model.engine.sampling import SamplingParams
from model.engine.sequence import RequestOutput

__all__ = ["BlockPool", "Engine", "EngineConfig", "KVExport", "Prefix", "RequestOutput", "SamplingParams"]
