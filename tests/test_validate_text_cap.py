"""Text too long for the prompt cap is refused before the tokenizer sees it (tokenizing holds the GIL:
a multi-megabyte prompt would stall the gateway's event loop), and the floor it uses is sound."""
import pytest

from model.tokenizer import Tokenizer
from pdserve.textcodec import Codec
from pdserve.validate import FieldError, Limits, prepare
from protos.pdserve.v1 import pdserve_pb2 as pb

LIMITS = Limits(model="smollm2-135m", vocab_size=49152, max_seq_len=8192, max_prompt_tokens=0)


@pytest.fixture(scope="module")
def tok(smollm2_gguf) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_gguf)


class NeverTokenizes(Codec):
    def encode(self, text):
        raise AssertionError("tokenized text that the cap alone refuses")

    def encode_chat(self, messages):
        raise AssertionError("tokenized messages that the cap alone refuses")


def test_megabytes_of_text_are_refused_untokenized(tok):
    codec = NeverTokenizes(tok, tok.vocab_size, tok.eos_token_id)
    huge = "All work and no play. " * 180_000  # ~4 MB
    with pytest.raises(FieldError, match="text: 3,960,000 bytes of text are at least") as e:
        prepare(pb.GenerateRequest(text=huge), LIMITS, codec, chat=False)
    assert e.value.field == "text"
    chat = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content=huge)])
    with pytest.raises(FieldError, match="messages: "):
        prepare(chat, LIMITS, codec, chat=True)


@pytest.mark.parametrize("text", ["a" * 20000, " " * 20000, "#" * 20000, "日本語のテキスト" * 1000, "\n\t " * 5000,
                                  "<|im_start|>" * 2000])
def test_the_floor_never_exceeds_the_real_count(tok, text):
    codec = Codec(tok, tok.vocab_size, tok.eos_token_id)
    floor = -(-len(text.encode()) // codec.max_token_bytes)
    assert len(codec.encode(text)) >= floor


def test_text_under_the_cap_is_still_tokenized(tok):
    codec = Codec(tok, tok.vocab_size, tok.eos_token_id)
    got = prepare(pb.GenerateRequest(text="Hello there"), LIMITS, codec, chat=False)
    assert got.prompt == tok.encode("Hello there")
