"""The parsed GGUF header (model/weights.py): shared by the weights and tokenizer of a load, cached on disk
under $PDSERVE_CACHE/gguf, and never served stale, damaged or for another file."""
import os
import warnings

import numpy as np
import pytest
import torch

import model.weights as weights
from model.config import QuantConfig
from model.loader import load
from model.tokenizer import Tokenizer
from model.weights import gguf_cache_dir, load_gguf, read_gguf_header

TINY_TOKENS = ["a", "b", "ab", "c", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "\n"]
TINY_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(autouse=True)
def _fresh_cache(tmp_path, monkeypatch):
    """Each test gets its own empty cache, no in-process memo, and its one warning back."""
    monkeypatch.setenv("PDSERVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(weights, "_warned_cache", False)
    weights._header.cache_clear()
    yield
    weights._header.cache_clear()


def _forget():
    """Drop the in-process memo, as a new process would start."""
    weights._header.cache_clear()


def write_tiny_gguf(path, name="tiny", dim=8, seed=0):
    """A complete 1-layer llama GGUF (F32, 2 heads, 1 KV head) with a byte-level BPE vocabulary."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_name(name)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(TINY_TOKENS))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(TINY_TOKENS)
    w.add_token_merges(["a b"])
    w.add_token_types([1, 1, 1, 1, 3, 3, 3, 1])
    w.add_bos_token_id(4)
    w.add_eos_token_id(5)
    w.add_chat_template(TINY_TEMPLATE)
    hd = dim // 2
    shapes = {"token_embd.weight": (len(TINY_TOKENS), dim), "output_norm.weight": (dim,),
              "blk.0.attn_norm.weight": (dim,), "blk.0.ffn_norm.weight": (dim,),
              "blk.0.attn_q.weight": (dim, dim), "blk.0.attn_k.weight": (hd, dim), "blk.0.attn_v.weight": (hd, dim),
              "blk.0.attn_output.weight": (dim, dim), "blk.0.ffn_gate.weight": (16, dim),
              "blk.0.ffn_up.weight": (16, dim), "blk.0.ffn_down.weight": (dim, 16)}
    for n, s in shapes.items():
        w.add_tensor(n, rng.standard_normal(s).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _cache_files():
    return sorted(gguf_cache_dir().glob("*.json"))


def _fail_parse(monkeypatch):
    """From here on, a gguf-py parse is an error: what is read must come from the cache."""
    def no_parse(path):
        raise AssertionError(f"{path} was parsed again")
    monkeypatch.setattr(weights, "_parse_header", no_parse)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


# -- the real SmolLM2 file: the cached header gives the same tokenizer and the same bits --------------------------
SAMPLE = [
    "Hello, world! How are you today?", "  leading spaces and\ttabs\n\nnew lines  ", "Numbers: 12345 and 3.14159, -42",
    "Unicode: naïve café, Zürich, ĳ, Ω≈ç√∫", "CJK 日本語のテキスト 中文 한국어", "emoji 😀👍🏽 🇫🇷",
    "code: def f(x):\n    return x ** 2  # comment", "<|im_start|>user\nhi<|im_end|>", "<|endoftext|>",
    "spelled <|im_start|> inside", "", " ", "a" * 300, "https://example.com/path?q=1&r=2",
]
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2? <|im_end|>"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 😀 in 日本語?"}]


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_gguf):
    """The tokenizer and float tensors read straight from gguf-py's reader, as before the cache existed."""
    from gguf import GGUFReader, quants

    reader = GGUFReader(smollm2_gguf)
    f = reader.fields
    meta = {k: v.contents() for k, v in f.items()}
    tok = Tokenizer.from_vocab(f["tokenizer.ggml.tokens"].contents(),
                               [tuple(m.split(" ", 1)) for m in f["tokenizer.ggml.merges"].contents()],
                               f["tokenizer.ggml.token_type"].contents(), meta)
    raw = {t.name: quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
           .reshape(tuple(int(d) for d in reversed(t.shape))) for t in reader.tensors}
    return tok, raw


def test_smollm2_from_cache_matches_gguf_py(smollm2_gguf, smollm2_reference, monkeypatch):
    ref_tok, ref_raw = smollm2_reference
    read_gguf_header(smollm2_gguf)  # cold: parsed and written
    assert len(_cache_files()) == 1
    _forget()
    _fail_parse(monkeypatch)
    tok = Tokenizer.from_gguf(smollm2_gguf)
    gg = load_gguf(smollm2_gguf)

    assert tok.backend.to_str() == ref_tok.backend.to_str()
    assert (tok.bos_token_id, tok.eos_token_id, tok.chat_template, tok.vocab_size) == \
        (ref_tok.bos_token_id, ref_tok.eos_token_id, ref_tok.chat_template, ref_tok.vocab_size)
    assert tok.chat_template and tok.token_id("<|im_start|>") is not None
    for text in SAMPLE:
        ids = tok.encode(text)
        assert ids == ref_tok.encode(text), text
        assert tok.encode_text(text) == ref_tok.encode_text(text), text
        assert tok.decode(ids) == ref_tok.decode(ids) == text, text
        assert tok.decode(ids, skip_special_tokens=True) == ref_tok.decode(ids, skip_special_tokens=True)
    assert tok.apply_chat_template(CHAT) == ref_tok.apply_chat_template(CHAT)
    chat = tok.encode_chat(CHAT)
    assert chat == ref_tok.encode_chat(CHAT) and tok.token_id("<|im_start|>") in chat
    assert tok.decode(chat) == tok.apply_chat_template(CHAT)

    # Same bits, tensor by tensor (the Q/K rows permuted back exactly as before).
    assert len(gg.tensors) == len(ref_raw)
    for gname, arr in ref_raw.items():
        name = weights._gguf_to_ours(gname)
        ref = torch.from_numpy(arr.copy())
        if name.endswith("q_proj.weight"):
            ref = weights._unpermute(ref, int(gg.metadata["llama.attention.head_count"]))
        elif name.endswith("k_proj.weight"):
            ref = weights._unpermute(ref, int(gg.metadata["llama.attention.head_count_kv"]))
        assert _same_bits(gg.tensors[name], ref), name


# -- a tiny GGUF: the cache's rules --------------------------------------------------------------------------------
def test_one_load_parses_once_and_later_processes_not_at_all(tmp_path, monkeypatch):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    parses, reads = [], []
    real_parse, real_read = weights._parse_header, weights._read_cached_header
    monkeypatch.setattr(weights, "_parse_header", lambda p: parses.append(p) or real_parse(p))
    monkeypatch.setattr(weights, "_read_cached_header", lambda *a: reads.append(a) or real_read(*a))
    first = load(str(path), quant=QuantConfig.off())
    assert len(parses) == len(reads) == 1  # weights and tokenizer shared one header, in memory
    _forget()
    _fail_parse(monkeypatch)
    again = load(str(path), quant=QuantConfig.off())  # a "new process": from the disk cache
    assert again.tokenizer.backend.to_str() == first.tokenizer.backend.to_str()
    assert again.tokenizer.encode_chat([{"role": "user", "content": "abc"}]) == \
        first.tokenizer.encode_chat([{"role": "user", "content": "abc"}])
    for k, v in first.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k


def _flip_token(data: bytes) -> bytes:
    """Valid JSON, same length, another vocabulary: only the digest can tell."""
    assert data.count(b'"ab"') == 1
    return data.replace(b'"ab"', b'"ba"')


@pytest.mark.parametrize("damage", [
    lambda d: d[: len(d) // 2],  # truncated (a crash mid-write without the rename)
    lambda d: b"",  # empty
    lambda d: os.urandom(len(d)),  # garbage
    lambda d: b'{"format": "x"}\n{}',  # JSON of another shape
    _flip_token,  # a changed body under the old digest
], ids=["truncated", "empty", "garbage", "foreign", "bitflip"])
def test_damaged_cache_is_a_miss_and_is_rebuilt(tmp_path, monkeypatch, damage):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    fresh = read_gguf_header(path)
    fresh_tok = Tokenizer.from_gguf(path)
    [file] = _cache_files()
    file.write_bytes(damage(file.read_bytes()))
    _forget()
    with pytest.warns(RuntimeWarning, match="unreadable GGUF header cache"):
        header = read_gguf_header(path)
    assert header == fresh
    assert Tokenizer.from_gguf(path).backend.to_str() == fresh_tok.backend.to_str()
    # Rebuilt: a later process reads it without parsing, and without a warning.
    _forget()
    _fail_parse(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_gguf_header(path) == fresh


def test_warns_once_per_process(tmp_path):
    paths = [write_tiny_gguf(tmp_path / f"t{i}.gguf", name=f"t{i}") for i in range(2)]
    for p in paths:
        read_gguf_header(p)
    for f in _cache_files():
        f.write_bytes(b"garbage")
    _forget()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for p in paths:
            read_gguf_header(p)
    assert len([w for w in seen if "GGUF header cache" in str(w.message)]) == 1


@pytest.mark.parametrize("change", ["mtime", "size"])
@pytest.mark.parametrize("memo", [True, False], ids=["same-process", "new-process"])
def test_changed_gguf_is_not_served_a_stale_entry(tmp_path, change, memo):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", name="aaaa")
    assert read_gguf_header(path).metadata["general.name"] == "aaaa"
    before = path.stat()
    # Same size (another name of the same length), or another size (a longer name) under the same mtime.
    write_tiny_gguf(path, name="bbbb" if change == "mtime" else "b" * 48, seed=1)
    if change == "mtime":
        assert path.stat().st_size == before.st_size
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    else:
        assert path.stat().st_size != before.st_size
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    if not memo:
        _forget()
    header = read_gguf_header(path)
    assert header.metadata["general.name"] == ("bbbb" if change == "mtime" else "b" * 48)
    assert header == weights._parse_header(path)
    assert len(_cache_files()) == 2  # the old entry is left alone (another process may still read that file)


def test_pdserve_cache_is_honoured(tmp_path, monkeypatch):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PDSERVE_CACHE", str(tmp_path / "elsewhere"))
    read_gguf_header(path)
    assert [f.parent for f in _cache_files()] == [tmp_path / "elsewhere" / "gguf"]
    assert not (tmp_path / "home").exists()
    monkeypatch.delenv("PDSERVE_CACHE")
    _forget()
    read_gguf_header(path)
    assert len(list((tmp_path / "home" / ".cache" / "pdserve" / "gguf").glob("*.json"))) == 1


def test_unwritable_cache_still_loads(tmp_path, monkeypatch):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("PDSERVE_CACHE", str(blocker))
    with pytest.warns(RuntimeWarning, match="GGUF header cache"):
        header = read_gguf_header(path)
    assert header.metadata["general.name"] == "tiny" and Tokenizer.from_gguf(path).encode("ab") == [2]
