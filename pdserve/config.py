"""The topology config of ``pdserve up``: a TOML (or JSON) file, every key optional.

```toml
[cluster]
model = "skv-tiny"          # preset or weight path
n_prefill = 1
n_decode = 1
num_cpus = 2                 # Ray's CPU count (local clusters only)
policy = "cache_aware"       # a scheduler.policies name
cost_correction = true       # scale the cost model's predictions by each worker's observed speed
kv_cache_bytes = 536870912   # per worker engine
max_seqs = 64
block_size = 16              # optional: must equal the model's (checked, never overridden)
device = "auto"              # auto (cuda for a worker with a GPU share, if torch sees CUDA; else cpu) | cpu | cuda
prefill_num_gpus = 0.5       # Ray GPU share per prefill worker, 0..1 (default 0: none); 1 = a GPU each,
decode_num_gpus = 0.5        #   0.5 and 0.5 = a prefill and a decode worker packed on one GPU
num_gpus = 0                 # GPUs a local Ray declares (0 = Ray detects them; fake ones test placement on CPU)

[store]
host_capacity_blocks = 4096
disk_capacity_blocks = 0
disk_dir = "/tmp/pdserve-kv"

[slo]
ttft_ms = 30000
tbt_ms = 100

[server]
host = "127.0.0.1"
port = 50051                 # 0 = a free port
metrics_port = 0             # 0 = a free port, -1 = no metrics endpoint
http_port = 0                # the OpenAI HTTP API and the dashboard: 0 = a free port, -1 = off
max_message_bytes = 4194304
max_prompt_tokens = 0        # 0 = the model's context minus one
max_tokens_limit = 4096
tls_cert = ""                # PEM files; both or neither
tls_key = ""
auth_token_env = ""          # the env var holding the bearer token clients must send

[topology]                   # several Ray nodes (with `pdserve up --address`); absent = one node
every_node = false           # true: a store and the per-node workers on every alive Ray node
prefill_per_node = 1
decode_per_node = 1
replication_threshold = 4    # cross-node fetches of a prefix before it is copied to the other nodes
nodes = [                    # or name them: match = a Ray node id, a custom resource of the node, or its IP
  { name = "a", match = "box-a", prefill = 1, decode = 0 },
  { name = "b", match = "box-b", prefill = 0, decode = 1 },
]

[resilience]
max_migrations = 3           # times one request may move to another worker when its worker dies
recovery_timeout_s = 60      # how long a moving request waits for a live worker (then UNAVAILABLE)
stall_timeout_s = 30         # no token nor keep-alive from a decode worker this long: lost (one step this long: stuck)
store_timeout_s = 10         # a store call without an answer by then: treated as a failed fetch
kv_load_failure = "recompute"  # KV that cannot be loaded (gone, late, bad checksum): recompute | fail
unresponsive_s = 1           # a worker that misses its pings this long leaves placement
admission_wait_s = 10        # a new request waits this long for a live worker (then UNAVAILABLE)
```

Unknown sections or keys, and values of the wrong type, fail with a message naming the key.
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path


DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    pass


@dataclass
class ClusterSection:
    model: str = "smollm2-135m"
    n_prefill: int = 1
    n_decode: int = 1
    num_cpus: int = 0  # 0 = all the machine's cores (at least 2)
    policy: str = "cache_aware"
    cost_correction: bool = True
    kv_cache_bytes: int = 512 * 2**20
    max_seqs: int = 64
    block_size: int = 0  # 0 = the model's
    device: str = "auto"
    prefill_num_gpus: float = 0.0
    decode_num_gpus: float = 0.0
    num_gpus: int = 0  # 0 = what Ray detects (local clusters only)


@dataclass
class StoreSection:
    host_capacity_blocks: int = 4096
    disk_capacity_blocks: int = 0
    disk_dir: str = ""


@dataclass
class SLOSection:
    ttft_ms: float = 30000.0
    tbt_ms: float = 100.0


@dataclass
class ServerSection:
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 0
    http_port: int = 0  # OpenAI HTTP API + dashboard; 0 = a free port, -1 = off
    max_message_bytes: int = 4 * 2**20
    max_prompt_tokens: int = 0
    max_tokens_limit: int = 4096
    tls_cert: str = ""
    tls_key: str = ""
    auth_token_env: str = ""


@dataclass
class TopologySection:
    every_node: bool = False
    prefill_per_node: int = 1
    decode_per_node: int = 1
    replication_threshold: int = 4
    nodes: list = field(default_factory=list)  # tables: name, match, prefill, decode

    def to_topology(self):
        """The section as a ``pdserve.topology.Topology`` (None: the single-node cluster)."""
        from pdserve.topology import NodeSpec, Topology, TopologyError

        specs = []
        for i, raw in enumerate(self.nodes):
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
                raise ConfigError(f"config key topology.nodes[{i}] must be a table with a string name")
            unknown = set(raw) - {"name", "match", "prefill", "decode"}
            if unknown:
                raise ConfigError(f"unknown config key topology.nodes[{i}].{sorted(unknown)[0]}; "
                                  "known: name, match, prefill, decode")
            counts = {k: raw.get(k, 0) for k in ("prefill", "decode")}
            if not isinstance(raw.get("match", ""), str) or any(type(v) is not int for v in counts.values()):
                raise ConfigError(f"config key topology.nodes[{i}]: match is a string, prefill and decode integers")
            specs.append(NodeSpec(raw["name"], raw.get("match", ""), counts["prefill"], counts["decode"]))
        try:
            topo = Topology(tuple(specs), self.every_node, self.prefill_per_node, self.decode_per_node)
        except TopologyError as e:
            raise ConfigError(f"config section [topology]: {e}") from None
        if self.replication_threshold < 1:
            raise ConfigError(f"config key topology.replication_threshold must be >= 1, got {self.replication_threshold!r}")
        return topo if topo.multi_node else None


@dataclass
class Resilience:
    max_migrations: int = 3
    recovery_timeout_s: float = 60.0
    stall_timeout_s: float = 30.0
    store_timeout_s: float = 10.0
    kv_load_failure: str = "recompute"
    unresponsive_s: float = 1.0
    admission_wait_s: float = 10.0

    def __post_init__(self) -> None:
        if self.kv_load_failure not in ("recompute", "fail"):
            raise ConfigError(f"config key resilience.kv_load_failure must be 'recompute' or 'fail', "
                              f"got {self.kv_load_failure!r}")
        for key in ("recovery_timeout_s", "stall_timeout_s", "store_timeout_s", "unresponsive_s"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"config key resilience.{key} must be > 0, got {getattr(self, key)!r}")
        if self.admission_wait_s < 0:
            raise ConfigError(f"config key resilience.admission_wait_s must be >= 0, got {self.admission_wait_s!r}")
        if self.max_migrations < 0:
            raise ConfigError(f"config key resilience.max_migrations must be >= 0, got {self.max_migrations!r}")


@dataclass
class Config:
    cluster: ClusterSection = field(default_factory=ClusterSection)
    store: StoreSection = field(default_factory=StoreSection)
    slo: SLOSection = field(default_factory=SLOSection)
    server: ServerSection = field(default_factory=ServerSection)
    resilience: Resilience = field(default_factory=Resilience)
    topology: TopologySection = field(default_factory=TopologySection)

    def validate(self) -> "Config":
        positive = {"cluster.n_prefill": self.cluster.n_prefill, "cluster.n_decode": self.cluster.n_decode,
                    "cluster.kv_cache_bytes": self.cluster.kv_cache_bytes, "cluster.max_seqs": self.cluster.max_seqs,
                    "store.host_capacity_blocks": self.store.host_capacity_blocks, "slo.ttft_ms": self.slo.ttft_ms,
                    "slo.tbt_ms": self.slo.tbt_ms, "server.max_message_bytes": self.server.max_message_bytes,
                    "server.max_tokens_limit": self.server.max_tokens_limit}
        for key, v in positive.items():
            if v <= 0:
                raise ConfigError(f"config key {key} must be > 0, got {v!r}")
        for key, v in {"cluster.num_cpus": self.cluster.num_cpus, "cluster.block_size": self.cluster.block_size,
                       "cluster.num_gpus": self.cluster.num_gpus,
                       "store.disk_capacity_blocks": self.store.disk_capacity_blocks,
                       "server.max_prompt_tokens": self.server.max_prompt_tokens}.items():
            if v < 0:
                raise ConfigError(f"config key {key} must be >= 0, got {v!r}")
        c = self.cluster
        check_gpu_keys(c.device, c.prefill_num_gpus, c.decode_num_gpus)
        if not -1 <= self.server.metrics_port <= 65535 or not 0 <= self.server.port <= 65535:
            raise ConfigError("config keys server.port (0..65535) and server.metrics_port (-1..65535) out of range")
        if not -1 <= self.server.http_port <= 65535:
            raise ConfigError(f"config key server.http_port must be in -1..65535, got {self.server.http_port!r}")
        if bool(self.server.tls_cert) != bool(self.server.tls_key):
            raise ConfigError("config keys server.tls_cert and server.tls_key go together: give both or neither")
        if self.store.disk_capacity_blocks and not self.store.disk_dir:
            raise ConfigError("config key store.disk_dir is needed when store.disk_capacity_blocks > 0")
        self.topology.to_topology()  # its own checks
        return self


def check_gpu_keys(device: str, prefill_num_gpus: float, decode_num_gpus: float) -> None:
    """The config's GPU keys, checked here and by ``LocalCluster`` (which tests build directly).

    A worker runs on one device, so its GPU share is a fraction of one GPU (Ray would also refuse
    shares above 1 that are not whole). ``cuda`` without a share is refused: that worker would use a
    GPU Ray does not account for, where Ray may place other workers too."""
    if device not in DEVICES:
        raise ConfigError(f"config key cluster.device must be one of {', '.join(DEVICES)}, got {device!r}")
    for key, share in (("prefill_num_gpus", prefill_num_gpus), ("decode_num_gpus", decode_num_gpus)):
        if not 0.0 <= share <= 1.0:
            raise ConfigError(f"config key cluster.{key} must be in 0..1 (a worker uses one GPU), got {share!r}")
    if device == "cuda" and not (prefill_num_gpus > 0 and decode_num_gpus > 0):
        raise ConfigError("config key cluster.device = 'cuda' needs a GPU share for every worker: set "
                          "cluster.prefill_num_gpus and cluster.decode_num_gpus > 0 (or device = 'auto')")


def _section(cls, name: str, raw: object):
    if not isinstance(raw, dict):
        raise ConfigError(f"config section [{name}] must be a table")
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, v in raw.items():
        if key not in known:
            raise ConfigError(f"unknown config key {name}.{key}; known: {', '.join(known)}")
        want = type(getattr(cls(), key))
        if want is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if type(v) is not want:
            raise ConfigError(f"config key {name}.{key} must be {want.__name__}, got {v!r}")
        values[key] = v
    return cls(**values)


def parse(raw: dict) -> Config:
    sections = {f.name: f.default_factory for f in dataclasses.fields(Config)}
    for name in raw:
        if name not in sections:
            raise ConfigError(f"unknown config section [{name}]; known: {', '.join(sections)}")
    return Config(**{name: _section(factory, name, raw.get(name, {})) for name, factory in sections.items()}).validate()


def load_config(path: str | Path | None) -> Config:
    """The defaults, or a TOML/JSON file's values over them."""
    if path is None:
        return Config().validate()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    text = path.read_text()
    try:
        raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    return parse(raw)
