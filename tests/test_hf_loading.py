"""Hugging Face Llama directories as transformers 5 writes them (``rope_parameters``, ``chat_template.jinja``),
checked against transformers' own Llama built from a random config (no download)."""
import dataclasses
import json
import shutil

import pytest
import torch

from model.config import QuantConfig
from model.loader import build, load
from model.quality import full_logits
from model.weights import WeightFileError, config_from_hf, load_hf_dir
from pdserve.textcodec import Codec

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

THETA = 50000.0
DIMS = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TOKENS = torch.randint(0, 256, (48,), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A random fp32 Llama with rope_theta 50000 and a chat tokenizer, both saved by transformers itself."""
    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(rope_theta=THETA, **DIMS)).eval()
    with torch.no_grad():  # the default init is tiny; make logits spread out so the check bites
        for p in ref.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 1.0)
    ref.save_pretrained(path, safe_serialization=True)
    hf_tok = _hf_tokenizer()
    hf_tok.save_pretrained(path)
    with torch.no_grad():
        logits = ref(TOKENS[None]).logits[0]
    return path, logits, hf_tok


def _hf_tokenizer():
    """A character-level tokenizer with ChatML markers as special tokens, wrapped for save_pretrained."""
    vocab = {chr(i): i - 32 for i in range(32, 127)}
    vocab.update({"\n": 95, "<unk>": 96, "<|im_start|>": 97, "<|im_end|>": 98})
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
    backend.decoder = tokenizers.decoders.Fuse()
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                for t in ("<|im_start|>", "<|im_end|>")])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>")
    tok.chat_template = TEMPLATE
    return tok


def _rel_diff(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


def test_config_is_the_transformers_5_format(llama_dir):
    cfg = json.loads((llama_dir[0] / "config.json").read_text())
    assert "rope_theta" not in cfg
    assert cfg["rope_parameters"] == {"rope_theta": THETA, "rope_type": "default"}


def test_logits_match_transformers_with_rope_parameters(llama_dir):
    path, expected, _ = llama_dir
    ours = load(str(path), quant=QuantConfig.off()).model
    assert ours.config.rope_theta == THETA
    got = full_logits(ours, TOKENS)
    assert got.shape == expected.shape
    assert _rel_diff(got, expected) <= 1e-4


def test_the_default_theta_would_be_caught(llama_dir):
    """The same weights with the base that ignoring rope_parameters gave (10000): the check above bites."""
    path, expected, _ = llama_dir
    hf, state = load_hf_dir(path)
    config = dataclasses.replace(config_from_hf(hf, "llama"), rope_theta=10000.0)
    got = full_logits(build(config.with_quant(QuantConfig.off()), state), TOKENS)
    assert _rel_diff(got, expected) > 0.1  # measured: 0.93 (and 1e-5 with the right base)


def test_chat_template_comes_from_chat_template_jinja(llama_dir):
    path, _, hf_tok = llama_dir
    assert (path / "chat_template.jinja").read_text() == TEMPLATE
    assert "chat_template" not in json.loads((path / "tokenizer_config.json").read_text())
    tok = load(str(path), quant=QuantConfig.off()).tokenizer
    assert tok.chat_template == TEMPLATE
    codec = Codec(tok, 256, tok.eos_token_id)
    assert codec.has_chat_template
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi <|im_end|>"}]
    rendered = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(messages) == rendered
    ids = codec.encode_chat(messages)
    assert tok.decode(ids) == rendered
    assert ids.count(98) == 2  # the content's "<|im_end|>" stays text, not a turn marker


def test_generate_chat_runs_through_the_template(llama_dir, capsys):
    """`pdserve generate --chat` on the directory (it was refused for want of a template)."""
    from pdserve.cli import main

    path, _, hf_tok = llama_dir
    rendered = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                          add_generation_prompt=True)
    n_prompt = len(hf_tok.encode(rendered, add_special_tokens=False))
    rc = main(["generate", "--model", str(path), "--chat", "--precision", "float32", "--max-tokens", "2", "hi"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"{n_prompt} prompt tokens" in err


@pytest.mark.parametrize("tok_cfg, expected", [
    ({"chat_template": "from config"}, "from config"),
    ({"chat_template": [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "dflt"}]}, "dflt"),
    ({"chat_template": [{"name": "tool_use", "template": "tools"}]}, "from jinja"),
    ({}, "from jinja"),
])
def test_chat_template_sources(tmp_path, llama_dir, tok_cfg, expected):
    from model.tokenizer import Tokenizer

    shutil.copy(llama_dir[0] / "tokenizer.json", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    (tmp_path / "chat_template.jinja").write_text("from jinja")
    assert Tokenizer.from_hf_dir(tmp_path, None, None).chat_template == expected


def _with_config(src, dst, **overrides):
    """The weights of ``src`` under a config.json that transformers writes for ``overrides``."""
    shutil.copy(src / "model.safetensors", dst)
    transformers.LlamaConfig(**{**DIMS, **overrides}).save_pretrained(dst)
    return dst


@pytest.mark.parametrize("overrides, message", [
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": THETA, "factor": 4.0,
                           "original_max_position_embeddings": 32}), "rope_parameters.rope_type 'yarn'"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": THETA, "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
     "rope_parameters.rope_type 'llama3' is not supported (only 'default')"),
    (dict(attention_bias=True, rope_theta=THETA), "attention_bias True is not supported"),
])
def test_transformers_written_configs_we_cannot_build_are_refused(tmp_path, llama_dir, overrides, message):
    with pytest.raises(WeightFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load(str(_with_config(llama_dir[0], tmp_path, **overrides)), quant=QuantConfig.off())


BASE = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 160,
        "num_hidden_layers": 2, "num_attention_heads": 4}


@pytest.mark.parametrize("fields, message", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling.rope_type 'llama3'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type 'linear'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type 'dynamic'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": THETA}}, "rope_parameters.rope_type 'yarn'"),
    ({"rope_parameters": "yarn"}, "rope_parameters 'yarn' is not an object"),
    ({"rope_theta": 10000.0, "rope_parameters": {"rope_theta": THETA}},
     "rope_theta = 10000, rope_parameters.rope_theta = 50000"),
    ({"attention_bias": True}, "attention_bias True is not supported"),
    ({"mlp_bias": True}, "mlp_bias True is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
])
def test_config_fields_we_cannot_build_are_refused(fields, message):
    with pytest.raises(WeightFileError, match=message):
        config_from_hf({**BASE, **fields}, "m")


@pytest.mark.parametrize("fields, theta", [
    ({}, 10000.0),
    ({"rope_theta": 500000.0, "rope_scaling": None}, 500000.0),  # transformers 4
    ({"rope_parameters": {"rope_type": "default", "rope_theta": THETA}}, THETA),  # transformers 5
    ({"rope_theta": THETA, "rope_parameters": {"rope_theta": THETA}}, THETA),
    ({"rope_scaling": {"type": "default"}, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}, 10000.0),
])
def test_rope_theta_from_either_format(fields, theta):
    assert config_from_hf({**BASE, **fields}, "m").rope_theta == theta
