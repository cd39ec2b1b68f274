"""Comparing greedy token streams between two correct engines."""
from model.quality import full_logits


def assert_same_greedy(model, prompt, expected, got):
    """Identical, or diverging only where the reference's top-2 logits are nearly tied.

    Exact in float and with float activations (int8 GEMMs accumulate exactly); with int8
    activations, a last-bit difference in a float sum can move one rounding step, which moves
    logits by up to about 1% of their scale: a "near tie" is a margin below that.
    """
    if got == expected:
        return
    assert model.config.quant.activations, "float activations must give identical tokens"
    j = next((k for k, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    logits = full_logits(model, prompt + expected[:j])[-1]
    top2 = logits.topk(2).values
    margin, tie = float(top2[0] - top2[1]), 0.01 * float(logits.abs().max())
    assert margin < tie, f"diverged at {j} with a clear margin {margin:.3f} (near-tie bound {tie:.3f})"
