"""Batch invariance, bit for bit: a sequence's numbers must not depend on what runs beside it.

The default precision (int8 weights, activations and KV) rounds activations to int8 after
float work; a last-bit difference in that float work moves a rounding step and can change a
greedy token. So every float op on the path must compute a row the same way whatever the
batch, the chunking, the padding or the slicing; these tests compare with ``torch.equal``.
"""
import pytest
import torch

import kernels
from kernels import reference
from model.config import QuantConfig
from model.engine.block_pool import BlockPool
from model.engine.paged import PagedBatch, Segment
from model.loader import build, random_state
from model.presets import get_preset
from model.quality import full_logits
from model.quant import QLinear, hadamard, hadamard_block, hadamard_rotate


# -- the input rotation ---------------------------------------------------------------------------
@pytest.mark.parametrize("width", [64, 576, 1536])
def test_hadamard_rotate_is_the_matrix_rotation_and_rows_are_independent(width):
    g = torch.Generator().manual_seed(width)
    x = torch.randn(33, width, generator=g) * torch.logspace(-2, 2, 33)[:, None]
    b = hadamard_block(width)
    got = hadamard_rotate(x, b)
    matrix = (x.reshape(33, -1, b) @ hadamard(b)).reshape(x.shape)
    torch.testing.assert_close(got, matrix, rtol=1e-5, atol=1e-5 * float(x.abs().max()))
    for i in (0, 7, 32):
        assert torch.equal(hadamard_rotate(x[i:i + 1], b), got[i:i + 1])
    assert torch.equal(hadamard_rotate(x[5:20], b), got[5:20])


def test_weights_are_rotated_by_the_same_function_as_activations():
    g = torch.Generator().manual_seed(1)
    layer = QLinear(576, 40, QuantConfig())
    w = torch.randn(40, 576, generator=g)
    layer.load_float(w)
    q, scale = kernels.quantize_rows(hadamard_rotate(w, hadamard_block(576)))
    assert torch.equal(layer.weight_q, q) and torch.equal(layer.weight_scale, scale.squeeze(-1))
    x = torch.randn(9, 576, generator=g)
    assert torch.equal(layer(x)[3:4], layer(x[3:4]))  # one row alone, as in a batch of 9


# -- attention kernels ----------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["torch", "C"])
def test_exp_computes_an_element_the_same_wherever_it_sits(where):
    """The exact attention relies on it. torch's CPU exp (MKL's) does not promise it: on an AVX-512 machine an
    element of a 7-element slice came out with other bits than in the whole tensor, in some runs and not others.
    The attention's exp (``reference.exp_nonpositive``, and the C loop's vectors and scalar tail) is one formula."""
    from kernels import cpu_fused, reference

    if where == "C" and not cpu_fused.available():
        pytest.skip("no C compiler")

    def exp(t: torch.Tensor) -> torch.Tensor:
        if where == "torch":
            return reference.exp_nonpositive(t)
        out = t.contiguous().clone()
        cpu_fused.library().pdserve_exp_nonpositive(out.data_ptr(), out.numel())
        return out

    x = -torch.rand(4099, generator=torch.Generator().manual_seed(5)) * 30
    whole = exp(x)
    assert torch.equal(torch.cat([exp(x[i:i + 7]) for i in range(0, 4099, 7)]), whole)
    assert torch.equal(exp(x[1:].view(-1, 3)[:, :2]).flatten(), whole[1:].view(-1, 3)[:, :2].flatten())
    assert torch.equal(torch.cat([exp(x[i:i + 9]) for i in range(0, 4099, 9)]), whole)  # starts off any vector


def _pool(g, n_blocks=40, bs=16, hkv=2, d=16):
    k, v = torch.randn(n_blocks, bs, hkv, d, generator=g), torch.randn(n_blocks, bs, hkv, d, generator=g)
    (kq, ks), (vq, vs) = kernels.quantize_rows(k), kernels.quantize_rows(v)
    return kq, vq, ks, vs


@pytest.mark.parametrize("window", [None, 7, 40])
def test_decode_attention_of_a_sequence_is_the_same_alone_in_a_batch_and_in_slices(window, monkeypatch):
    g = torch.Generator().manual_seed(2)
    kq, vq, ks, vs = _pool(g)
    lens = torch.tensor([150, 3, 77, 16, 17, 121])
    tables = torch.full((6, 10), -1)
    perm = torch.randperm(40, generator=g)
    at = 0
    for i, n in enumerate(lens.tolist()):
        m = -(-n // 16)
        tables[i, :m] = perm[at:at + m]
        at += m
    q = torch.randn(6, 6, 16, generator=g)
    batched = reference.paged_decode_attention(q, kq, vq, ks, vs, tables, lens, window)
    monkeypatch.setattr(reference, "DECODE_SLICE_BYTES", 1)
    sliced = reference.paged_decode_attention(q, kq, vq, ks, vs, tables, lens, window)
    monkeypatch.undo()
    assert torch.equal(sliced, batched)
    monkeypatch.setattr(reference, "PV_CHUNKED_MIN", 0)  # the float32 chunked sums: the same exact integers
    assert torch.equal(reference.paged_decode_attention(q, kq, vq, ks, vs, tables, lens, window), batched)
    monkeypatch.undo()
    for i in range(6):
        alone = reference.paged_decode_attention(q[i:i + 1], kq, vq, ks, vs, tables[i:i + 1, :-(-int(lens[i]) // 16)],
                                                 lens[i:i + 1], window)
        assert torch.equal(alone[0], batched[i]), f"sequence {i}"


@pytest.mark.parametrize("window", [None, 9])
def test_prefill_rows_are_the_same_whole_chunked_and_decoded_one_by_one(window, monkeypatch):
    g = torch.Generator().manual_seed(3)
    kq, vq, ks, vs = _pool(g)
    table = torch.randperm(40, generator=g)[:6]  # 96 positions
    n = 90
    q = torch.randn(n, 6, 16, generator=g)
    whole = reference.paged_prefill_attention(q, kq, vq, ks, vs, table, 0, window)
    chunked = torch.cat([reference.paged_prefill_attention(q[a:b], kq, vq, ks, vs, table, a, window)
                         for a, b in [(0, 5), (5, 6), (6, 40), (40, 41), (41, 90)]])
    assert torch.equal(chunked, whole)
    monkeypatch.setattr(reference, "PREFILL_SLICE_ROWS", 7)  # causal query slices, each over fewer keys
    assert torch.equal(reference.paged_prefill_attention(q, kq, vq, ks, vs, table, 0, window), whole)
    monkeypatch.undo()
    for p in (0, 1, 17, 63, 89):
        decoded = reference.paged_decode_attention(q[p:p + 1], kq, vq, ks, vs, table[None], torch.tensor([p + 1]), window)
        assert torch.equal(decoded[0], whole[p]), f"position {p}"
    # the contiguous cache's kernel, handed the same int8 K/V, computes the same rows
    pos = torch.arange(n)
    slots = table[pos // 16] * 16 + pos % 16
    kv = (kq.view(-1, 2, 16)[slots], vq.view(-1, 2, 16)[slots])
    scales = dict(k_scale=ks.view(-1, 2, 1)[slots], v_scale=vs.view(-1, 2, 1)[slots])
    assert torch.equal(reference.attention(q, *kv, pos, pos, window, **scales), whole)
    assert torch.equal(reference.attention(q[60:61], *kv, pos[60:61], pos, window, **scales)[0], whole[60])


def test_float_kv_attention_rows_do_not_depend_on_the_rows_beside_them():
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(50, 4, 16, generator=g), torch.randn(50, 1, 16, generator=g), torch.randn(50, 1, 16, generator=g)
    pos = torch.arange(50)
    whole = reference.attention(q, k, v, pos, pos, 12)
    for p in (0, 13, 49):
        lo = max(0, p - 11)
        assert torch.equal(reference.attention(q[p:p + 1], k[lo:p + 1], v[lo:p + 1], pos[p:p + 1], pos[lo:p + 1], 12)[0],
                           whole[p])


# -- the whole model through the paged engine's backend ------------------------------------------
class PagedRun:
    """Sequences with blocks reserved up front; each ``step`` runs segments of several of them in one forward."""

    def __init__(self, model, prompts):
        cfg = model.config
        self.model, self.prompts, bs = model, prompts, cfg.block_size
        need = sum(-(-len(p) // bs) for p in prompts)
        self.pool = BlockPool(cfg, [need] * len(cfg.kv_groups))
        self.tables = [[[self.pool.allocate(g) for _ in range(-(-len(p) // bs))] for g in range(len(cfg.kv_groups))]
                       for p in prompts]
        self.logits = [[None] * len(p) for p in prompts]

    def step(self, segments: list[tuple[int, int, int]]) -> None:
        """segments: (sequence, start, n)."""
        tokens = torch.tensor([t for i, a, n in segments for t in self.prompts[i][a:a + n]])
        with torch.inference_mode():
            out = self.model(tokens, PagedBatch(self.pool, [Segment(self.tables[i], a, n) for i, a, n in segments]))
        at = 0
        for i, a, n in segments:
            self.logits[i][a:a + n] = list(out[at:at + n])
            at += n

    def of(self, i: int) -> torch.Tensor:
        return torch.stack(self.logits[i])


def _alone(model, prompt, chunks=None):
    run = PagedRun(model, [prompt])
    for a, b in chunks or [(0, len(prompt))]:
        run.step([(0, a, b - a)])
    return run.of(0)


def _mixed(model, prompts, target):
    """The target sequence in chunks of 13, 1, 1, 29, ... beside neighbours that prefill and decode."""
    run = PagedRun(model, prompts)
    done = [0] * len(prompts)
    sizes = [13, 1, 1, 29, 2, 1]
    k = 0
    while any(d < len(p) for d, p in zip(done, prompts)):
        segs = []
        for i, p in enumerate(prompts):
            if done[i] >= len(p):
                continue
            n = sizes[k % len(sizes)] if i == target else (7 if done[i] < len(p) // 2 else 1)
            n = min(n, len(p) - done[i])
            segs.append((i, done[i], n))
            done[i] += n
        run.step(segs[::-1] if k % 2 else segs)  # the target's rows move around the batch
        k += 1
    return run.of(target)


def _prompts(vocab, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def test_skv_tiny_int8_logits_are_bit_identical_alone_batched_and_chunked():
    cfg = get_preset("skv-tiny")
    assert cfg.quant == QuantConfig()  # the default: int8 weights, activations and KV, rotated
    model = build(cfg, random_state(cfg, 0))
    prompts = _prompts(cfg.vocab_size, [70, 9, 33, 50], seed=1)  # longer than the local window (24)
    whole = _alone(model, prompts[0])
    assert torch.equal(_alone(model, prompts[0], [(0, 24), (24, 25), (25, 61), (61, 70)]), whole)
    assert torch.equal(_alone(model, prompts[0], [(i, i + 1) for i in range(70)]), whole)  # decode path only
    assert torch.equal(_mixed(model, prompts, 0), whole)
    assert torch.equal(_mixed(model, prompts, 2), _alone(model, prompts[2]))
    assert torch.equal(full_logits(model, prompts[0]), whole)  # the contiguous cache hands the kernel the same int8 K/V


def test_smollm2_int8_logits_are_bit_identical_alone_and_batched(smollm2_int8):
    model = smollm2_int8.model
    prompts = _prompts(model.config.vocab_size, [40, 7, 23], seed=2)
    whole = _alone(model, prompts[0])
    assert torch.equal(_mixed(model, prompts, 0), whole)
    assert torch.equal(_alone(model, prompts[0], [(0, 17), (17, 18), (18, 40)]), whole)
