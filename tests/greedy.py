"""Comparing greedy token streams between two correct engines."""
from model.config import QuantConfig
from model.quality import full_logits


def is_batch_invariant(model) -> bool:
    """The default precision (int8 weights, activations and KV) computes every token the same way in any batch."""
    return model.config.quant == QuantConfig()


def assert_same_greedy(model, prompt, expected, got):
    """Identical, except at a near tie in a non-default precision with int8 activations.

    The default int8 path is batch-invariant: its GEMMs accumulate exactly in int32, its
    rotations and attention sum in a fixed (exact) order, so batched, chunked and alone give
    the same bits and the same tokens. Other precisions run float GEMMs (F.linear) whose
    summation order BLAS picks by the number of rows, so their last bits depend on the batch.
    With float activations that stays in the last bits (tokens must still agree); with int8
    activations (e.g. without rotation) a last-bit difference moves one rounding step, up to
    about 1% of the logits' scale, and can flip an argmax whose top-2 margin is below that.
    """
    if got == expected:
        return
    assert not is_batch_invariant(model), f"the default precision must give identical tokens: {expected} != {got}"
    assert model.config.quant.activations, "float activations must give identical tokens"
    j = next((k for k, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    logits = full_logits(model, prompt + expected[:j])[-1]
    top2 = logits.topk(2).values
    margin, tie = float(top2[0] - top2[1]), 0.01 * float(logits.abs().max())
    assert margin < tie, f"diverged at {j} with a clear margin {margin:.3f} (near-tie bound {tie:.3f})"
