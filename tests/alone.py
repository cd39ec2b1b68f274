"""The reference the cluster tests compare tokens with: skv-tiny (the default int8, batch-invariant) serving each
prompt alone, in the test's own process, on one torch thread (the Ray workers keep the cores busy, and two
intra-op threads on two busy cores crawl)."""
import contextlib

from model.config import QuantConfig
from model.engine import Engine, EngineConfig, SamplingParams
from model.loader import load
from threads import one_torch_thread


@contextlib.contextmanager
def skv_tiny_alone(default: SamplingParams):
    """Yields ``run(prompt, params=default) -> tokens``."""
    with one_torch_thread():
        engine = Engine(load("skv-tiny", quant=QuantConfig()).model, EngineConfig(kv_cache_bytes=64 * 2**20, max_seqs=1))
        yield lambda prompt, params=default: engine.generate([prompt], params)[0]
