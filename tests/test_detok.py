"""Incremental detokenization: at every step the same text as decoding every id at once (the tokenizers
library's own decode is the reference), while each step decodes only the last few ids."""
import random

import pytest
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

from model.engine import Engine, EngineConfig, SamplingParams
from model.loader import load
from model.tokenizer import TextSoFar, Tokenizer
from pdserve.textcodec import Codec, Detokenizer

TEXT = ("Grüße aus Köln! 北京欢迎你 🙂👍🏽 naïve café — «ελληνικά» ∑x² = 1\n\tdef f(x): return x ** 2\n"
        "<|im_end|> and <|im_start|>assistant\n")


@pytest.fixture(scope="module")
def tok(smollm2_gguf) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_gguf)


class CountingDecode:
    """A decode function that records how many ids each call decodes."""

    def __init__(self, decode):
        self.decode, self.sizes = decode, []

    def __call__(self, ids):
        self.sizes.append(len(ids))
        return self.decode(ids)


def _check_every_step(decode, ids, rng: random.Random) -> TextSoFar:
    text, k = TextSoFar(decode), 0
    while k < len(ids):
        n = rng.choice([1, 1, 1, 2, 3, 7])
        got = text.add(ids[k:k + n])
        k += n
        assert got == decode(ids[:k]), (k, got[-20:], decode(ids[:k])[-20:])
    return text


def test_text_so_far_is_the_full_decode_at_every_step(tok):
    rng = random.Random(0)
    real = tok.encode(TEXT * 3)  # multi-byte characters split across tokens, control tokens spelled as text
    specials = [tok.token_id("<|im_start|>"), tok.token_id("<|im_end|>")]
    assert len(real) > 100 and any(tok.decode(real[:k]).endswith("\ufffd") for k in range(len(real)))
    _check_every_step(tok.decode, real + specials + real, rng)
    noise = [rng.randrange(tok.vocab_size) for _ in range(600)]  # lone bytes: invalid UTF-8 mid-stream
    assert "\ufffd" in tok.decode(noise)
    _check_every_step(tok.decode, noise, rng)


def test_text_so_far_decodes_a_bounded_window(tok):
    """The point of it: a 1,600-token output costs a few tokens' decode per step, not the whole output's."""
    ids = tok.encode(TEXT * 24)
    counting = CountingDecode(tok.decode)
    text = TextSoFar(counting)
    for i in ids:
        text.add([i])
    assert text.text == tok.decode(ids) and len(ids) > 1500
    assert max(counting.sizes) <= 8 and len(counting.sizes) <= 2 * len(ids)


def test_text_so_far_with_the_character_codec_and_a_metaspace_decoder():
    rng = random.Random(1)
    codec = Codec(None, 600, None)  # ids past 258 read as <|tN|> markers
    _check_every_step(codec.decode, [rng.randrange(600) for _ in range(400)], rng)
    # a SentencePiece-style decoder drops the first token's leading space: a piece decoded alone differs from
    # the same piece after others, which the settled context handles (no concatenation of standalone decodes)
    vocab = {"▁the": 0, "▁cat": 1, "▁sat": 2, "s": 3, "▁on": 4, "▁mat": 5, "▁": 6, "<unk>": 7}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    ids = [rng.randrange(7) for _ in range(300)]
    decode = lambda xs: hf.decode(xs)  # noqa: E731
    assert decode([1]) == "cat" and decode([0, 1]) == "the cat"
    counting = CountingDecode(decode)
    text = TextSoFar(counting)
    for i in ids:
        assert text.add([i]) == decode(ids[:len(text.ids)])
    assert max(counting.sizes) <= 4  # no fall-back to decoding everything


def test_streamed_deltas_add_up_and_never_split_a_character(tok):
    ids = tok.encode(TEXT * 2)
    detok, out = Detokenizer(Codec(tok, tok.vocab_size, tok.eos_token_id)), []
    for i in ids:
        delta = detok.add([i])
        assert "\ufffd" not in delta
        out.append(delta)
    out.append(detok.flush())
    assert "".join(out) == tok.decode(ids) == TEXT * 2


def test_engine_text_is_the_decode_of_its_tokens(tok):
    """The engine keeps each request's text token by token: the streamed text of a generation is the decode
    of its tokens (random weights over SmolLM2's tokenizer, so the tokens cross many byte boundaries)."""
    model = load("skv-tiny").model
    vocab = model.config.vocab_size
    engine = Engine(model, EngineConfig(num_blocks=32, max_batched_tokens=64), tokenizer=tok)
    engine.eos_ids = set()
    ids = [engine.add_request(list(range(5, 15 + 3 * i)), SamplingParams(max_tokens=40, temperature=1.0, seed=i))
           for i in range(3)]
    tokens, text = {i: [] for i in ids}, {i: "" for i in ids}
    for o in engine.stream():
        tokens[o.request_id] += o.token_ids
        text[o.request_id] += o.text
    assert all(len(tokens[i]) == 40 and max(tokens[i]) < vocab for i in ids)
    assert all(text[i] == tok.decode(tokens[i]) for i in ids)


def test_the_detok_benchmark_times_both_ways(capsys):
    from benchmarks import detok

    detok.main(["--batch", "4", "--lengths", "40,80", "--rounds", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 40 |") or line.startswith("| 80 |")]
    assert len(rows) == 2 and all(line.rstrip().endswith("x |") for line in rows), rows
