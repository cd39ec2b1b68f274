import torch

from model.config import QuantConfig
from model.engine import SamplingParams
from model.generate import generate
from model.loader import build, load, random_state
from model.presets import get_preset
from model.quality import full_logits
from model.weights import save_checkpoint


def test_int8_checkpoint_round_trip_is_bit_exact(tmp_path):
    cfg = get_preset("skv-tiny")
    model = build(cfg, random_state(cfg, 4))
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(path, cfg, model.state_dict())
    again = load(str(path)).model
    assert again.config == cfg
    assert again.layers[1].self_attn.qkv_proj.weight_q.dtype == torch.int8
    tokens = list(range(3, 40))
    assert torch.equal(full_logits(model, tokens), full_logits(again, tokens))
    assert list(generate(model, [5, 6], SamplingParams(max_tokens=10))) == list(generate(again, [5, 6], SamplingParams(max_tokens=10)))


def test_float_checkpoint_refuses_another_precision(tmp_path):
    import pytest

    cfg = get_preset("skv-tiny").with_quant(QuantConfig.off())
    model = build(cfg, random_state(cfg, 4))
    path = tmp_path / "f.safetensors"
    save_checkpoint(path, cfg, model.state_dict())
    with pytest.raises(ValueError, match="saved as float32"):
        load(str(path), quant=QuantConfig())


def test_seeded_temperature_sampling_is_reproducible():
    cfg = get_preset("skv-tiny")
    model = build(cfg, random_state(cfg, 4))
    a = list(generate(model, [5, 6, 7], SamplingParams(max_tokens=16, temperature=1.0, seed=11)))
    b = list(generate(model, [5, 6, 7], SamplingParams(max_tokens=16, temperature=1.0, seed=11)))
    c = list(generate(model, [5, 6, 7], SamplingParams(max_tokens=16, temperature=1.0, seed=12)))
    assert a == b and len(a) == 16
    assert a != c
