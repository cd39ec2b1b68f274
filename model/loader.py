"""Builds a ready model (and its tokenizer) from a preset name or a weight path."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from model.config import ModelConfig, QuantConfig
from model.kv_cache import ContiguousKVCache
from model.presets import ANALYTIC, PRESETS, get_preset
from model.quant import QEmbedding, QLinear, smoothing_factors
from model.tokenizer import Tokenizer
from model.transformer import RMSNorm, Transformer
from model.weights import (WeightFileError, config_from_gguf, config_from_hf, load_checkpoint, load_gguf,
                           load_hf_dir, smollm2_gguf_path)


@dataclasses.dataclass
class Loaded:
    model: Transformer
    tokenizer: Tokenizer | None


def load(name_or_path: str, quant: QuantConfig | None = None, seed: int = 0,
         device: str | torch.device = "cpu", random_weights: bool = False) -> Loaded:
    """A preset name (``smollm2-135m``...) or a path: ``.gguf`` file, HF Llama directory, pdserve ``.safetensors``.

    ``device`` is where the model's weights and buffers live (the engine puts its KV pools there
    too): weights are read and quantized on the host, then moved. ``random_weights`` builds a
    preset, analytic ones included (``cai-13b-skv``), with random int8 weights made directly on
    ``device``: a 13B-class model to time on one GPU with nothing to carry.
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for, but torch {torch.__version__} sees no CUDA device here")
    if random_weights:
        config = get_preset(name_or_path)
        return Loaded(random_model(config.with_quant(quant) if quant else config, device, seed), None)
    loaded = _load_host(name_or_path, quant, seed)
    if device.type != "cpu":
        loaded.model.to(device)
    return loaded


def _load_host(name_or_path: str, quant: QuantConfig | None, seed: int) -> Loaded:
    if name_or_path in PRESETS:
        return _load_preset(get_preset(name_or_path), quant, seed)
    path = Path(name_or_path)
    if not path.exists():
        get_preset(name_or_path)  # raises the "unknown preset" error listing the known ones
    if path.suffix == ".gguf":
        gg = load_gguf(path)
        config = config_from_gguf(gg.metadata, path.stem)
        config = dataclasses.replace(config, tie_embeddings="lm_head.weight" not in gg.tensors)
        config = config.with_quant(quant) if quant else config
        return Loaded(build(config, gg.tensors), Tokenizer.from_gguf(path))
    if path.is_dir():
        hf, state = load_hf_dir(path)
        config = config_from_hf(hf, path.name)
        config = config.with_quant(quant) if quant else config
        return Loaded(build(config, state), Tokenizer.from_hf_dir(path, config.bos_token_id, config.eos_token_id))
    if path.suffix == ".safetensors":
        config, state = load_checkpoint(path)
        if quant is not None and quant != config.quant:
            raise ValueError(f"{path} was saved as {config.quant.tag}; it cannot be reloaded as {quant.tag}")
        model = Transformer(config)
        _load_exact(model, state, path)
        return Loaded(model, None)
    raise ValueError(f"don't know how to load {path}: expected a preset, a .gguf file, an HF directory "
                     f"or a pdserve .safetensors checkpoint")


def _load_preset(config: ModelConfig, quant: QuantConfig | None, seed: int) -> Loaded:
    if config.name in ANALYTIC:
        raise ValueError(f"preset {config.name!r} is an analytic config (cost models only): it has no weights")
    config = config.with_quant(quant) if quant else config
    if config.weights is None:
        return Loaded(build(config, random_state(config, seed)), None)
    path = smollm2_gguf_path()
    gg = load_gguf(path)
    state = gg.tensors
    if config.weights == "smollm2:skv":
        from model.convert import to_shared_kv
        from model.distill.delta import apply_shipped

        # The committed distillation delta (model/deltas/), if any, replaces the retrained tensors.
        state = apply_shipped(config, to_shared_kv(state, config))
    return Loaded(build(config, state), Tokenizer.from_gguf(path))


def random_state(config: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Float weights for a random model, scaled so that its logits are peaked (no greedy near-ties)."""
    shapes = float_shapes(config)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("layernorm.weight") or name == "norm.weight":
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            state[name] = torch.randn(shape, generator=gen) / (shape[-1] ** 0.5 if len(shape) > 1 else 1.0)
    state["embed_tokens.weight"] = torch.randn(shapes["embed_tokens.weight"], generator=gen)
    return state


@torch.no_grad()
def random_model(config: ModelConfig, device: torch.device, seed: int = 0) -> Transformer:
    """A model of ``config`` with random weights made in place on ``device`` (no float copy on the host).

    int8 codes are uniform in [-127, 127] with scales that give each output unit variance
    (std of a code is ~73), so activations keep a realistic range through the layers; it is
    for timing and memory, not for text.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device(device):
        model = Transformer(config)
    for mod in model.modules():
        if isinstance(mod, QLinear) and mod.int8_weights:
            mod.weight_q.random_(-127, 128, generator=gen)
            mod.weight_scale.fill_(1.0 / (73.3 * mod.in_features ** 0.5))
        elif isinstance(mod, QLinear):
            mod.weight.normal_(0.0, mod.in_features ** -0.5, generator=gen)
        elif isinstance(mod, QEmbedding) and mod.int8:
            mod.weight_q.random_(-127, 128, generator=gen)
            mod.weight_scale.fill_(1.0 / 73.3)
        elif isinstance(mod, QEmbedding):
            mod.weight.normal_(generator=gen)
    return model.eval()


def float_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every checkpoint tensor (Hugging Face names) a model of this config reads."""
    c, qd, kvd = config, config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    shapes = {"embed_tokens.weight": (c.vocab_size, c.dim), "norm.weight": (c.dim,)}
    if not c.tie_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.dim)
    for i in range(c.n_layers):
        p = f"layers.{i}."
        shapes.update({p + "input_layernorm.weight": (c.dim,), p + "post_attention_layernorm.weight": (c.dim,),
                       p + "self_attn.q_proj.weight": (qd, c.dim), p + "self_attn.o_proj.weight": (c.dim, qd),
                       p + "mlp.gate_proj.weight": (c.ffn_dim, c.dim), p + "mlp.up_proj.weight": (c.ffn_dim, c.dim),
                       p + "mlp.down_proj.weight": (c.dim, c.ffn_dim)})
        if c.produces_kv(i):
            shapes.update({p + "self_attn.k_proj.weight": (kvd, c.dim), p + "self_attn.v_proj.weight": (kvd, c.dim)})
    return shapes


def build(config: ModelConfig, state: dict[str, torch.Tensor], calibration: torch.Tensor | None = None) -> Transformer:
    """Quantizes float weights into a model of ``config``; smoothing is calibrated on real activations."""
    smooth: dict[str, torch.Tensor] = {}
    q = config.quant
    if q.weights and q.activations and q.smooth_alpha is not None:
        ref = Transformer(config.with_quant(QuantConfig.off()))
        load_float_state(ref, state)
        if calibration is None:
            calibration = calibration_tokens(config)
        for name, absmax in activation_absmax(ref, calibration).items():
            f = smoothing_factors(absmax, module_weight(state, name, config), q.smooth_alpha)
            if f is not None:
                smooth[name] = f
    model = Transformer(config)
    load_float_state(model, state, smooth)
    return model


def calibration_tokens(config: ModelConfig) -> torch.Tensor:
    if config.weights and config.weights.startswith("smollm2"):
        from model.texts import CALIBRATION

        tok = Tokenizer.from_gguf(smollm2_gguf_path())
        return torch.tensor([t for text in CALIBRATION for t in tok.encode(text)])
    return torch.randint(0, config.vocab_size, (256,), generator=torch.Generator().manual_seed(1234))


@torch.inference_mode()
def activation_absmax(model: Transformer, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| seen by each linear layer over ``tokens``."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, QLinear):
            def hook(_m, args, _out, name=name):
                a = args[0].reshape(-1, args[0].shape[-1]).abs().amax(0).float()
                seen[name] = torch.maximum(seen[name], a) if name in seen else a
            hooks.append(mod.register_forward_hook(hook))
    try:
        model(tokens, ContiguousKVCache(model.config, len(tokens)).extend(len(tokens)))
    finally:
        for h in hooks:
            h.remove()
    return seen


# Our fused projections and the checkpoint tensors (Hugging Face names) they are made of.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def module_parts(name: str, config: ModelConfig) -> list[str]:
    """Checkpoint tensor names that make up the float weight of module ``name``."""
    if name == "lm_head" and config.tie_embeddings:
        return ["embed_tokens.weight"]
    prefix, _, leaf = name.rpartition(".")
    if leaf not in FUSED:
        return [name + ".weight"]
    parts = FUSED[leaf]
    if leaf == "qkv_proj" and not config.produces_kv(int(name.split(".")[1])):
        parts = parts[:1]
    return [f"{prefix}.{p}.weight" for p in parts]


def module_weight(state: dict[str, torch.Tensor], name: str, config: ModelConfig) -> torch.Tensor:
    parts = module_parts(name, config)
    for key in parts:
        if state.get(key) is None:
            raise WeightFileError(f"weights for {config.name!r} lack tensor {key!r}")
    widths = {tuple(state[k].shape[1:]) for k in parts}
    if len(widths) > 1:
        raise WeightFileError(f"tensors {', '.join(parts)} have mismatched shapes "
                              f"{[tuple(state[k].shape) for k in parts]}")
    return state[parts[0]] if len(parts) == 1 else torch.cat([state[k] for k in parts])


def load_float_state(model: Transformer, state: dict[str, torch.Tensor],
                     smooth: dict[str, torch.Tensor] | None = None) -> None:
    smooth = smooth or {}
    config = model.config
    used = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, (QLinear, QEmbedding, RMSNorm)):
            continue
        used.update(module_parts(name, config))
        weight = module_weight(state, name, config)
        try:
            if isinstance(mod, QLinear):
                mod.load_float(weight, smooth.get(name))
            elif isinstance(mod, QEmbedding):
                mod.load_float(weight)
            else:
                if mod.weight.shape != weight.shape:
                    raise ValueError(f"shape {tuple(weight.shape)}, expected {tuple(mod.weight.shape)}")
                mod.weight.data.copy_(weight)
        except ValueError as e:
            raise WeightFileError(f"weights for {config.name!r}, {' + '.join(module_parts(name, config))}: {e}") from e
    extra = sorted(set(state) - used - {"rotary_emb.inv_freq"})
    if extra:
        raise WeightFileError(f"weights for {model.config.name!r} hold tensors the config has no place for: "
                              f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")


def _load_exact(model: Transformer, state: dict[str, torch.Tensor], path: Path) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightFileError(f"{path} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
