"""The shipped result: only the changed tensors, int8 as served, over the published base weights.

A delta is trained for one base (the converted tensors it replaces, hashed) and one
student config (layer layout, heads, widths). Applied to anything else it would silently
produce a broken model, so ``apply_delta`` refuses any mismatch and names the field.
Replaced matrices are stored exactly as int8 serving holds them (rotated basis, per output
channel): ``unpack_int8`` gives back a float weight that QLinear re-quantizes to the same bytes.
Norm vectors are stored as float32. A low-rank adapter (``<name>:lora_a`` / ``:lora_b``, float16)
changes a whole matrix for a few bytes: ``merged`` folds it into the base, serving quantizes the sum.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import ModelConfig
from model.distill.fakequant import pack_int8, unpack_int8
from model.distill.student import LORA_A, LORA_B

DELTA_DIR = Path(__file__).resolve().parent.parent / "deltas"
META_KEY = "pdserve.delta"
FORMAT = 2  # 2 added norms and low-rank adapters; format 1 files (int8 matrices only) still read


class DeltaMismatchError(ValueError):
    """A delta trained for another base model, preset or config."""


@dataclass(frozen=True)
class DeltaInfo:
    preset: str
    base_sha256: str  # of the base tensors the delta replaces, in sorted name order
    config_sha256: str  # of the student's architecture (quantization excluded)
    tensors: tuple[str, ...]  # base tensors the delta changes (replaced or adapted)
    notes: str = ""  # how it was trained and what it measured; free text


def architecture_hash(config: ModelConfig) -> str:
    """Everything that decides which tensors exist and what they mean; not the name, weights source or quant."""
    raw = json.loads(config.to_json())
    for k in ("name", "quant", "weights", "block_size", "max_seq_len"):
        raw.pop(k, None)
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()


def tensors_hash(state: dict[str, torch.Tensor], names: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for n in sorted(names):
        if n not in state:
            raise DeltaMismatchError(f"the base weights have no tensor {n!r} for the delta to replace")
        t = state[n].detach().float().contiguous().cpu()
        h.update(n.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def base_name(key: str) -> str:
    """The base tensor a trained tensor or adapter factor belongs to."""
    return key.removesuffix(LORA_A).removesuffix(LORA_B)


def save_delta(path: str | Path, config: ModelConfig, base: dict[str, torch.Tensor],
               trained: dict[str, torch.Tensor], notes: str = "") -> DeltaInfo:
    """``trained``: replaced tensors by name, and adapter factors under ``<name>:lora_a/b``."""
    from safetensors.torch import save_file

    names = tuple(sorted({base_name(k) for k in trained}))
    info = DeltaInfo(config.name, tensors_hash(base, names), architecture_hash(config), names, notes)
    tensors: dict[str, torch.Tensor] = {}
    for n, w in trained.items():
        if n != base_name(n):
            tensors[n] = w.detach().to(torch.float16)
            continue
        if tuple(w.shape) != tuple(base[n].shape):
            raise ValueError(f"trained {n} has shape {tuple(w.shape)}, the base {tuple(base[n].shape)}")
        if w.dim() == 1:
            tensors[n] = w.detach().float()
        else:
            tensors[n], tensors[n + ":scale"] = pack_int8(w)
    meta = {META_KEY: json.dumps({"format": FORMAT, **info.__dict__})}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return info


def read_delta(path: str | Path) -> tuple[DeltaInfo, dict[str, torch.Tensor]]:
    """The delta's identity and its tensors: replaced ones as float weights, adapter factors as stored."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get(META_KEY)
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise DeltaMismatchError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    if meta is None:
        raise DeltaMismatchError(f"{path}: no {META_KEY!r} metadata: not a pdserve distillation delta")
    fields = json.loads(meta)
    if fields.pop("format", None) not in (1, FORMAT):
        raise DeltaMismatchError(f"{path}: delta format is not 1 or {FORMAT}")
    info = DeltaInfo(**{**fields, "tensors": tuple(fields["tensors"])})
    weights = {}
    for k, t in raw.items():
        if k.endswith(":scale"):
            continue
        weights[k] = unpack_int8(t, raw[k + ":scale"]) if k + ":scale" in raw else t.float()
    return info, weights


def merged(weights: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The delta's tensors as full replacements of ``base``'s: adapters folded in (W + B @ A)."""
    out = {n: w for n, w in weights.items() if n == base_name(n)}
    for n in {base_name(k) for k in weights if k != base_name(k)}:
        out[n] = base[n].float() + weights[n + LORA_B] @ weights[n + LORA_A]
    return out


def apply_delta(path: str | Path, config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with the delta's tensors replaced; refuses a delta made for another preset, config or base."""
    info, weights = read_delta(path)
    if info.preset != config.name:
        raise DeltaMismatchError(f"{path}: delta field 'preset' is {info.preset!r}, the model is {config.name!r}")
    if info.config_sha256 != architecture_hash(config):
        raise DeltaMismatchError(f"{path}: delta field 'config_sha256' does not match the architecture of "
                                 f"{config.name!r} (layers, heads or widths differ from what it was trained for)")
    got = tensors_hash(state, info.tensors)
    if got != info.base_sha256:
        raise DeltaMismatchError(f"{path}: delta field 'base_sha256' is {info.base_sha256[:12]}..., the base "
                                 f"weights it would replace hash to {got[:12]}...: trained over another base model")
    return {**state, **merged(weights, state)}


def shipped_delta(preset: str) -> Path | None:
    path = DELTA_DIR / f"{preset}.safetensors"
    return path if path.is_file() else None


def apply_shipped(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The loader's hook: the committed delta for this preset if there is one, else ``state`` unchanged."""
    path = shipped_delta(config.name)
    return state if path is None else apply_delta(path, config, state)
