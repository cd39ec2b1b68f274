"""The general-text eval (model.general_text) and the recipe's frontier presets."""
import json

import pytest
import torch

from model.config import QuantConfig
from model.distill.data import _EVAL_TOPICS, _TASKS, _TRAIN_TOPICS, PACKAGED_DIR, DataSpec, prompts
from model.general_text import LONG_TOKENS, SHORT_TOKENS, passages, shingles
from model.presets import FRONTIER, get_preset
from model.quality import compare_split, full_logits
from model.texts import CALIBRATION, EVAL

WIDTH = 12  # tokens: a shared run this long would mean the same text is in both sets


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    from model.tokenizer import Tokenizer

    return Tokenizer.from_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def general(tokenizer):
    return passages(tokenizer.encode)


def test_passages_are_short_and_long_from_distinct_files(general):
    short, long = general
    assert len(short) >= 6 and len(long) >= 2
    assert all(len(p.tokens) == SHORT_TOKENS < 1024 for p in short)
    assert all(len(p.tokens) == LONG_TOKENS > 1100 for p in long)
    assert not {p.source for p in short} & {p.source for p in long}
    assert len({tuple(p.tokens) for p in short + long}) == len(short) + len(long)


def test_general_text_is_disjoint_from_every_training_and_chat_eval_source(general, tokenizer):
    """No run of WIDTH tokens of the general text appears in the distillation's prompts (train and
    eval; the training data is the teacher's samples on the train prompts), its shipped chat eval
    set, or the int8 calibration / prompt texts."""
    ours = set().union(*(shingles(p.tokens, WIDTH) for p in general[0] + general[1]))
    every = {split: len(_TASKS) * len(topics) for split, topics in (("train", _TRAIN_TOPICS), ("eval", _EVAL_TOPICS))}
    texts = [p for split, n in every.items() for p in prompts(DataSpec(split, n))] + CALIBRATION + EVAL
    theirs = [tokenizer.encode(t) for t in texts]
    shipped = sorted(PACKAGED_DIR.glob("*.json"))
    assert shipped, "the chat eval set should ship"
    for path in shipped:
        theirs += json.loads(path.read_text())["sequences"]
    for seq in theirs:
        assert not shingles(seq, WIDTH) & ours
    # the check can fail: a passage's own run is found
    assert shingles(general[0][0].tokens[100:140], WIDTH) & ours


def test_compare_split_counts_each_position_once():
    from model.loader import load

    a = load("skv-tiny", quant=QuantConfig.off(), seed=0).model
    b = load("skv-tiny", quant=QuantConfig.off(), seed=1).model
    seqs = [list(range(3, 43)), list(range(50, 80))]
    before, after = compare_split(a, b, seqs, split_at=16)
    assert before.tokens == 32 and after.tokens == 24 + 14
    same_before, same_after = compare_split(a, a, seqs, split_at=16)
    assert same_before.top1 == same_after.top1 == 1.0 and abs(same_after.kl) < 1e-5
    assert after.top1 < 1.0 and after.kl > 0.01


def test_frontier_kv_shrinks_step_by_step():
    kv8k = [get_preset(n).kv_bytes_per_token(8192) for n in FRONTIER[:-1]]
    assert kv8k == sorted(kv8k, reverse=True) and len(set(kv8k)) == len(kv8k)


@pytest.mark.slow
def test_windows_only_preset_is_the_original_inside_the_window(smollm2_int8, tokenizer):
    """Below 1024 tokens a sliding window hides nothing and the KV heads are unchanged, so the
    windows-only conversion must give the original's logits bit for bit (the frontier table shows
    the later steps differing)."""
    from model.distill.evaluate import served_student

    tokens = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6)
    ref = full_logits(smollm2_int8.model, tokens)
    assert torch.equal(full_logits(served_student("smollm2-135m-w", None), tokens), ref)


def test_plain_training_text_avoids_the_eval_trees_and_passages(general, tokenizer):
    """The plain-text distillation source reads package sources only, and no row of it shares a run
    of OVERLAP_TOKENS tokens with the general-text eval."""
    from model.distill.plain_text import OVERLAP_TOKENS, forbidden_roots, plain_text_sequences, source_files

    files = source_files()
    assert len(files) > 100
    stdlib, share = forbidden_roots()
    assert not any(share in f.parents for f in files)
    assert not any(stdlib in f.parents and "site-packages" not in f.parts for f in files)
    rows = plain_text_sequences(tokenizer.encode, 20_000, 256)
    assert len(rows) == 79 and all(len(r) == 256 for r in rows)
    held_out = set().union(*(shingles(p.tokens, OVERLAP_TOKENS) for p in general[0] + general[1]))
    assert not any(shingles(r, OVERLAP_TOKENS) & held_out for r in rows)
