"""Cost models: how long a prefill, a decode step and a KV transfer take on one instance.

One functional form serves the analytic roofline presets and the fits that ``pdserve calibrate``
measures, so the Conductor, the policies and the simulator all predict with the same code:

    prefill(new, cached) = overhead + per_token * new + per_pair * attention_pairs(cached, new)
    decode_step(batch, kv_bytes) = overhead + weights + per_seq * batch + per_byte * kv_bytes
    transfer(bytes) = latency + bytes / bandwidth

``attention_pairs`` counts (query, key) pairs a prefill attends over: global layers see the
whole context, local (sliding-window) layers at most ``window`` keys, weighted by the share of
layers of each kind. An instance is a whole serving unit (the 8 GPUs of a tensor-parallel node
for LLaMA3-70B, one GPU for the 13B-class model).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Hardware:
    """One instance's peak figures; ``source`` says where each number comes from."""

    name: str
    flops: float  # dense peak of the compute dtype, whole instance, FLOP/s
    hbm_bytes_per_s: float  # whole instance
    hbm_bytes: float  # whole instance
    net_bytes_per_s: float  # KV transfer between instances
    mfu: float  # achieved fraction of peak FLOPs in prefill
    mbu: float  # achieved fraction of HBM bandwidth in decode
    source: str


# NVIDIA A800 SXM4 80GB = A100 SXM4 80GB with NVLink capped at 400 GB/s: 312 TFLOPS dense bf16,
# 2,039 GB/s HBM2e (NVIDIA A100 datasheet). Mooncake FAST'25 (Qin et al., section 8): 8 of them
# per node, RDMA NICs with up to 800 Gbps per node. MFU 0.5 / MBU 0.7: typical of a tuned TP-8 stack.
A800_X8 = Hardware("8xA800-SXM4-80GB", flops=8 * 312e12, hbm_bytes_per_s=8 * 2.039e12, hbm_bytes=8 * 80e9,
                   net_bytes_per_s=800e9 / 8, mfu=0.5, mbu=0.7,
                   source="NVIDIA A100 datasheet (A800 = A100 with 400 GB/s NVLink); Mooncake FAST'25 sec. 8 "
                          "(8 GPUs, 800 Gbps RDMA per node)")
# H100 SXM5 80GB: 1,979 TOPS dense int8, 989 TFLOPS dense bf16, 3.35 TB/s HBM3 (NVIDIA H100 datasheet,
# ../shared/anchors.md); one 400 Gbps NDR InfiniBand NIC per GPU (DGX H100 reference design).
H100 = Hardware("1xH100-SXM5-80GB", flops=1979e12, hbm_bytes_per_s=3.35e12, hbm_bytes=80e9,
                net_bytes_per_s=400e9 / 8, mfu=0.4, mbu=0.7,
                source="NVIDIA H100 datasheet (int8 dense 1979 TOPS, HBM3 3.35 TB/s); DGX H100 (400 Gbps NDR per GPU)")


@dataclass(frozen=True)
class CostModel:
    name: str
    prefill_overhead_s: float
    prefill_s_per_token: float
    prefill_s_per_pair: float
    decode_overhead_s: float
    decode_weights_s: float  # reading the weights once per step
    decode_s_per_seq: float
    decode_s_per_kv_byte: float
    kv_bytes_global_per_token: float  # KV every token keeps forever (global groups)
    kv_bytes_local_per_token: float  # KV only the last ``window`` tokens keep (local groups)
    window: int = 0  # 0: no local layers
    local_layer_frac: float = 0.0  # share of attention layers that are local
    net_bytes_per_s: float = 100e9
    net_latency_s: float = 0.0
    decode_kv_capacity_bytes: float = 0.0  # memory for KV on a decode instance; 0 = unbounded
    max_batch: int = 256
    source: str = ""

    # -- the three predictions -------------------------------------------------------------------
    def prefill_time(self, new: int, cached: int = 0) -> float:
        new = max(1, new)
        return (self.prefill_overhead_s + self.prefill_s_per_token * new
                + self.prefill_s_per_pair * self.attention_pairs(cached, new))

    def decode_step_time(self, batch: int, kv_bytes: float) -> float:
        if batch <= 0:
            return 0.0
        return (self.decode_overhead_s + self.decode_weights_s + self.decode_s_per_seq * batch
                + self.decode_s_per_kv_byte * kv_bytes)

    def transfer_time(self, n_bytes: float) -> float:
        return 0.0 if n_bytes <= 0 else self.net_latency_s + n_bytes / self.net_bytes_per_s

    # -- helpers ---------------------------------------------------------------------------------
    def kv_bytes(self, tokens: int) -> float:
        """KV held for a sequence of ``tokens`` (local groups only keep the window)."""
        local = min(tokens, self.window) if self.window else tokens
        return self.kv_bytes_global_per_token * tokens + self.kv_bytes_local_per_token * local

    def attention_pairs(self, cached: int, new: int) -> float:
        """Key positions the ``new`` queries attend to, averaged over layer kinds."""
        total = new * cached + new * (new + 1) / 2
        if not self.window or not self.local_layer_frac:
            return total
        w, lo, hi = self.window, cached + 1, cached + new  # query i sees min(i, w) keys
        below = max(0, min(hi, w) - lo + 1)
        first = lo
        local = below * (first + first + below - 1) / 2 + (new - below) * w
        return (1 - self.local_layer_frac) * total + self.local_layer_frac * local

    def kv_capacity_tokens(self, tokens_per_seq: int = 8192) -> float:
        if not self.decode_kv_capacity_bytes:
            return float("inf")
        return self.decode_kv_capacity_bytes / (self.kv_bytes(tokens_per_seq) / tokens_per_seq)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "CostModel":
        raw = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"cost model JSON: unknown fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**raw)


def roofline(name: str, config, hw: Hardware, bytes_per_param: float) -> CostModel:
    """A cost model from a model config (``model.config.ModelConfig``) and an instance's hardware:
    prefill is compute-bound (2 FLOPs per parameter per token, 4 per attended pair per head dim),
    decode is bandwidth-bound (weights once per step, plus every sequence's KV)."""
    params = _param_count(config)
    flops = hw.flops * hw.mfu
    bw = hw.hbm_bytes_per_s * hw.mbu
    attn_width = config.n_heads * config.head_dim * config.n_layers
    weight_bytes = params * bytes_per_param
    return CostModel(
        name=name, prefill_overhead_s=0.02, prefill_s_per_token=2 * params / flops,
        prefill_s_per_pair=4 * attn_width / flops,
        decode_overhead_s=0.005, decode_weights_s=weight_bytes / bw, decode_s_per_seq=2 * params / flops,
        decode_s_per_kv_byte=1 / bw, **_kv_shape(config),
        net_bytes_per_s=hw.net_bytes_per_s, net_latency_s=0.001,
        decode_kv_capacity_bytes=0.9 * hw.hbm_bytes - weight_bytes,
        source=f"roofline of {config.name} ({params / 1e9:.1f}B params) on {hw.name}: {hw.source}; "
               f"MFU {hw.mfu}, MBU {hw.mbu}")


def _kv_shape(config) -> dict:
    """A cost model's KV fields from a model config: facts of the model, whatever the machine."""
    per_tok = config.kv_bytes_per_token_per_group
    local = [g for g in config.kv_groups if g.window is not None]
    return dict(kv_bytes_global_per_token=per_tok * (len(config.kv_groups) - len(local)),
                kv_bytes_local_per_token=per_tok * len(local), window=local[0].window if local else 0,
                local_layer_frac=sum(1 for s in config.layers if s.attention == "local") / config.n_layers)


def with_kv_of(cost: CostModel, config) -> CostModel:
    """``cost``'s timings with the KV sizes of the model it serves: a guessed model (``CPU_FALLBACK``, 1,000 bytes
    per token) put SmolLM2's int8 KV (~12 KB per token) at a twelfth, so its transfers and KV reads too."""
    return dataclasses.replace(cost, **_kv_shape(config), source=f"{cost.source}; KV sizes of {config.name}")


def _param_count(c) -> int:
    attn = sum(c.dim * c.n_heads * c.head_dim * 2 + (2 * c.dim * c.n_kv_heads * c.head_dim if c.produces_kv(i) else 0)
               for i in range(c.n_layers))
    ffn = c.n_layers * 3 * c.dim * c.ffn_dim
    emb = c.vocab_size * c.dim * (1 if c.tie_embeddings else 2)
    return attn + ffn + emb


def preset(name: str) -> CostModel:
    from model.presets import get_preset

    if name == "llama3-70b-a800":
        return roofline(name, get_preset("llama3-70b"), A800_X8, bytes_per_param=2)
    if name == "cai-13b-skv-h100":
        return roofline(name, get_preset("cai-13b-skv"), H100, bytes_per_param=1)
    raise ValueError(f"unknown cost model {name!r}; known: {', '.join(PRESETS)}, or a JSON file from `pdserve calibrate`")


PRESETS = ("llama3-70b-a800", "cai-13b-skv-h100")


def load_cost_model(name_or_path: str) -> CostModel:
    """A preset name, or the path of a JSON fit written by ``pdserve calibrate``."""
    if name_or_path in PRESETS:
        return preset(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"cost model file {path} does not exist (run `pdserve calibrate --out {path}`)")
        return CostModel.from_json(path.read_text())
    return preset(name_or_path)


CALIBRATION = Path("~/.cache/pdserve/cost_model.json")

# A rough guess for a small model on a 2-core CPU (skv-tiny / SmolLM2-135M class), used by the live
# cluster until `pdserve calibrate` has written a fit for this machine.
CPU_FALLBACK = CostModel("cpu-fallback", prefill_overhead_s=0.01, prefill_s_per_token=2e-4, prefill_s_per_pair=1e-8,
                         decode_overhead_s=0.02, decode_weights_s=0.0, decode_s_per_seq=2e-3,
                         decode_s_per_kv_byte=1e-10, kv_bytes_global_per_token=1000.0,
                         kv_bytes_local_per_token=0.0, net_bytes_per_s=1e9,
                         source="guess for a small model on a 2-core CPU; run `pdserve calibrate` for a fit")


def live_cost_model(model_name: str, name_or_path: str | None = None) -> CostModel:
    """The cost model a live cluster predicts with: the one named, else this machine's calibration
    of ``model_name`` if there is one, else ``CPU_FALLBACK``."""
    if name_or_path:
        return load_cost_model(name_or_path)
    path = CALIBRATION.expanduser()
    if path.is_file():
        fit = CostModel.from_json(path.read_text())
        if fit.name == f"calibrated:{model_name}":
            return fit
    return CPU_FALLBACK
