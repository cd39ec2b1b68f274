"""The engine on SmolLM2 with its tokenizer: greedy parity, EOS, stop strings, streaming text."""
import pytest

from model.engine import Engine, EngineConfig, SamplingParams
from model.generate import generate

from greedy import assert_same_greedy

pytestmark = pytest.mark.slow
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "How do I reverse a list in Python?",
             "Give me three tips for sleeping better.", "Explain photosynthesis in one sentence."]


def chat(tok, q):
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]))


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_batched_engine_matches_single_sequence_generation(precision, request):
    loaded = request.getfixturevalue(f"smollm2_{precision}")
    tok, model = loaded.tokenizer, loaded.model
    prompts = [chat(tok, q) for q in QUESTIONS]
    engine = Engine(model, EngineConfig(max_batched_tokens=64), tokenizer=tok)
    got = engine.generate(prompts, SamplingParams(max_tokens=24))
    for p, g in zip(prompts, got):
        expected = list(generate(model, p, SamplingParams(max_tokens=24), (tok.eos_token_id,)))
        assert_same_greedy(model, p, expected, g)


def test_eos_and_stop_strings_end_requests_with_clean_text(smollm2_int8):
    tok, model = smollm2_int8.tokenizer, smollm2_int8.model
    engine = Engine(model, tokenizer=tok)
    a = engine.add_request(chat(tok, QUESTIONS[0]), SamplingParams(max_tokens=200))
    b = engine.add_request(chat(tok, QUESTIONS[1]), SamplingParams(max_tokens=200, stop=(",", "\n")))
    texts, reasons, counts = {a: "", b: ""}, {}, {}
    for out in engine.stream():
        texts[out.request_id] += out.text
        if out.finished:
            reasons[out.request_id] = out.finish_reason
            counts[out.request_id] = out.completion_tokens
    assert reasons == {a: "stop", b: "stop"}
    assert counts[a] < 200 and "<|im_end|>" not in texts[a] and texts[a].strip()
    assert "," not in texts[b] and "\n" not in texts[b] and texts[b].strip()
    assert engine.pool.free_counts() == engine.pool.capacity
