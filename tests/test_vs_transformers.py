"""The faithful fp32 path against transformers' own Llama, built from a random config (no download)."""
import pytest
import torch

from model.config import QuantConfig
from model.engine import SamplingParams
from model.generate import generate
from model.loader import load
from model.quality import full_logits

transformers = pytest.importorskip("transformers")


def _random_llama(tmp_path, n_kv_heads, tie, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=n_kv_heads, max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
    )
    ref = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # the default init is tiny; make logits spread out so the check bites
        for p in ref.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 1.0)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    return ref


@pytest.mark.parametrize("n_kv_heads, tie", [(2, False), (1, True), (4, False)])
def test_logits_match_transformers_llama(tmp_path, n_kv_heads, tie):
    ref = _random_llama(tmp_path, n_kv_heads, tie)
    ours = load(str(tmp_path), quant=QuantConfig.off()).model
    tokens = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(tokens[None]).logits[0]
    got = full_logits(ours, tokens)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_incremental_decode_matches_transformers_greedy(tmp_path):
    ref = _random_llama(tmp_path, 2, False, seed=3)
    ours = load(str(tmp_path), quant=QuantConfig.off()).model
    prompt = [5, 17, 99, 3, 250, 42]
    with torch.no_grad():
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    got = list(generate(ours, prompt, SamplingParams(max_tokens=20)))
    assert got == expected


def test_rope_is_transformers_rotation_bit_for_bit():
    """One step's rotation (tables gathered once, rotate_half's sign folded into sin, halves swapped by roll)
    gives transformers' ``apply_rotary_pos_emb`` bits exactly, in float32, at scattered positions."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from model.transformer import Rotary

    rope = Rotary(64, 100000.0, 4096)
    g = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 4096, (37,), generator=g)
    x = torch.randn(37, 9, 64, generator=g) * 3
    cos, sin = rope.cos[positions][None], rope.sin[positions][None]  # [1, N, D]
    want, _ = apply_rotary_pos_emb(x.transpose(0, 1)[None], x.transpose(0, 1)[None], cos, sin)
    got = rope.at(positions)(x)
    assert torch.equal(got, want[0].transpose(0, 1))
