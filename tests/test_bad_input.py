"""Bad input gets a clear exception that names the problem."""
import shutil

import pytest
import torch

from model.config import QuantConfig
from model.engine import SamplingParams
from model.generate import generate
from model.loader import build, load, random_state
from model.presets import get_preset
from model.weights import WeightFileError, load_checkpoint, load_gguf


@pytest.fixture(scope="module")
def tiny():
    cfg = get_preset("skv-tiny")
    return build(cfg, random_state(cfg, 0))


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown model preset 'gpt-5'"):
        load("gpt-5")


def test_analytic_preset_has_no_weights():
    with pytest.raises(ValueError, match="analytic config"):
        load("llama3-70b")


def test_truncated_gguf(tmp_path, smollm2_gguf):
    bad = tmp_path / "truncated.gguf"
    with open(smollm2_gguf, "rb") as src:
        bad.write_bytes(src.read(1_000_000))
    with pytest.raises(WeightFileError, match="truncated.gguf"):
        load_gguf(bad)


def test_garbage_gguf(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(WeightFileError, match="not a readable GGUF"):
        load(str(bad))


def test_malformed_safetensors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(WeightFileError, match="not a readable safetensors"):
        load_checkpoint(bad)


def test_safetensors_without_our_config(tmp_path):
    from safetensors.torch import save_file

    f = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(f))
    with pytest.raises(WeightFileError, match="without a pdserve config"):
        load(str(f))


def test_hf_dir_missing_weights(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(WeightFileError, match="no \\*.safetensors"):
        load(str(tmp_path))


def test_prompt_longer_than_context(tiny):
    limit = tiny.config.max_seq_len
    with pytest.raises(ValueError, match=f"exceeds the model's context of {limit}"):
        next(generate(tiny, [3] * limit, SamplingParams(max_tokens=1)))


def test_empty_prompt(tiny):
    with pytest.raises(ValueError, match="prompt is empty"):
        next(generate(tiny, [], SamplingParams()))


def test_out_of_vocab_token(tiny):
    with pytest.raises(ValueError, match="token ids must lie in"):
        next(generate(tiny, [3, 99999], SamplingParams(max_tokens=1)))


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=-5), "max_tokens"), (dict(max_tokens=2.5), "max_tokens"),
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
])
def test_invalid_sampling(kwargs, field):
    with pytest.raises(ValueError, match=f"invalid sampling parameter {field}="):
        SamplingParams(**kwargs)


def test_weights_for_another_shape_are_refused():
    cfg = get_preset("skv-tiny")
    state = random_state(cfg, 0)
    state["layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="3x3|\\(3, 3\\)"):
        build(cfg.with_quant(QuantConfig.off()), state)
    state = random_state(cfg, 0)
    del state["layers.4.self_attn.q_proj.weight"]
    with pytest.raises(WeightFileError, match="layers.4.self_attn.q_proj.weight"):
        build(cfg, state)
