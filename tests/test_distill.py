"""Distillation (issue 9): the delta's identity checks, its exact int8 round trip, tiny training, the shipped delta."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from model.config import ModelConfig, QuantConfig, shared_kv_layers
from model.convert import to_shared_kv
from model.distill.delta import DeltaMismatchError, apply_delta, read_delta, save_delta, shipped_delta
from model.distill.student import kl_per_token
from model.distill.train import Setup, TrainConfig, Trainer, adapted_names, seed_from_delta, trainable_names
from model.loader import build, random_state
from model.presets import get_preset
from model.quality import full_logits

TINY_TEACHER = ModelConfig(name="tiny-gqa", vocab_size=512, dim=64, n_layers=12, n_heads=4, n_kv_heads=2,
                           head_dim=16, ffn_dim=128, rope_theta=10000.0, max_seq_len=1024, quant=QuantConfig.off())


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops on a busy machine: one thread avoids OpenMP spin-waits that make them 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_setup(seed: int = 0) -> Setup:
    student = get_preset("skv-tiny")
    teacher_state = random_state(TINY_TEACHER, seed)
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, 512, (40,), generator=g).tolist() for _ in range(30)]
    return Setup(TINY_TEACHER, teacher_state, student, to_shared_kv(teacher_state, student), seqs, seqs[:8])


def _tiny_trained_delta(tmp_path, setup: Setup):
    trained = {n: setup.student_base[n] + 0.01 * torch.randn_like(setup.student_base[n])
               for n in trainable_names(setup.student)}
    path = tmp_path / "delta.safetensors"
    save_delta(path, setup.student, setup.student_base, trained)
    return path, trained


def test_delta_applies_exactly_its_tensors_and_round_trips_int8(tmp_path):
    setup = _tiny_setup()
    path, trained = _tiny_trained_delta(tmp_path, setup)
    state = apply_delta(path, setup.student, setup.student_base)
    changed = {n for n in state if not torch.equal(state[n], setup.student_base[n])}
    assert changed == set(trainable_names(setup.student))
    model = build(setup.student, state)  # int8 serving form: the delta's bytes survive re-quantization
    _, weights = read_delta(path)
    direct = build(setup.student, {**setup.student_base, **trained})
    q = model.layers[1].self_attn.qkv_proj.weight_q
    assert torch.equal(q, direct.layers[1].self_attn.qkv_proj.weight_q)
    assert weights.keys() == trained.keys()


def test_delta_for_another_base_or_config_is_refused(tmp_path):
    setup = _tiny_setup()
    path, _ = _tiny_trained_delta(tmp_path, setup)
    other_base = to_shared_kv(random_state(TINY_TEACHER, 1), setup.student)
    with pytest.raises(DeltaMismatchError, match="base_sha256"):
        apply_delta(path, setup.student, other_base)
    other_layout = dataclasses.replace(setup.student, layers=shared_kv_layers(12, window=24, local_share=1,
                                                                              global_share=2))
    with pytest.raises(DeltaMismatchError, match="config_sha256"):
        apply_delta(path, other_layout, setup.student_base)
    with pytest.raises(DeltaMismatchError, match="preset"):
        apply_delta(path, dataclasses.replace(setup.student, name="smollm2-135m-skv"), setup.student_base)
    (tmp_path / "junk.safetensors").write_bytes(b"not a delta")
    with pytest.raises(DeltaMismatchError, match="not a readable"):
        apply_delta(tmp_path / "junk.safetensors", setup.student, setup.student_base)


def test_widened_delta_stores_norms_and_adapters_and_serving_merges_them(tmp_path):
    setup = _tiny_setup()
    cfg = TrainConfig(steps=30, batch=4, seq_len=16, long_seq_len=32, lr=3e-3, objective="kl", widen_rank=4,
                      eval_every=30, lr_schedule="cosine", out=str(tmp_path / "run"))
    trainer = Trainer(cfg, setup)
    rows = trainer.rows[:8]

    def kl() -> float:
        with torch.no_grad():
            return float(kl_per_token(trainer.teacher(rows), trainer.student(rows)).mean())

    before = kl()
    trainer.run()
    after = kl()
    assert after < 0.9 * before, (before, after)
    assert trainer.opt.param_groups[1]["lr"] == pytest.approx(cfg.lr * 0.1 * cfg.widen_lr_scale, rel=0.05)
    trained = trainer.student.trained_state()
    path = tmp_path / "delta.safetensors"
    info = save_delta(path, setup.student, setup.student_base, trained)
    wide = set(trainable_names(setup.student, 4)) | set(adapted_names(setup.student, 4))
    assert set(info.tensors) == wide and any(n.endswith("norm.weight") for n in wide)
    state = apply_delta(path, setup.student, setup.student_base)
    assert {n for n in state if not torch.equal(state[n], setup.student_base[n])} == wide
    name = "layers.3.mlp.down_proj.weight"  # adapter folded in: base + B @ A (factors stored as float16)
    b, a = trained[name + ":lora_b"], trained[name + ":lora_a"]
    assert torch.allclose(state[name], setup.student_base[name] + b @ a, atol=1e-3)
    seeded_setup = _tiny_setup()  # a later run starts from this delta, adapters included
    factors = seed_from_delta(seeded_setup, read_delta(path)[1], widen_rank=4)
    seeded = Trainer(cfg, seeded_setup)
    seeded.seed_adapters(factors)
    factor = name + ":lora_b"  # trained away from its zero start, so an unseeded run fails this
    assert torch.allclose(seeded.student.param(factor), trainer.student.param(factor), atol=1e-3)
    with pytest.raises(ValueError, match="widen_rank=0 does not train"):
        seed_from_delta(_tiny_setup(), read_delta(path)[1], widen_rank=0)
    served = build(setup.student, state)  # and the served student is the one training measured
    with torch.no_grad():
        logits = full_logits(served, rows[0].tolist())
        trained_logits = trainer.student(rows[:1])[0]
    assert (logits.argmax(-1) == trained_logits.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("objective", ["layerwise", "kl"])
def test_tiny_training_reduces_the_loss(tmp_path, objective):
    cfg = TrainConfig(steps=40, batch=4, seq_len=16, long_seq_len=32, lr=3e-3, objective=objective,
                      eval_every=40, out=str(tmp_path / "run"))
    trainer = Trainer(cfg, _tiny_setup())
    gen = torch.Generator().manual_seed(5)
    fixed = torch.randint(0, len(trainer.rows), (8,), generator=gen)

    def fixed_loss() -> float:
        with torch.no_grad():
            if objective == "layerwise":
                from model.distill.layerwise import layerwise_loss
                return float(layerwise_loss(trainer.student, trainer.targets, fixed))
            rows = trainer.rows[fixed]
            return float(kl_per_token(trainer.teacher(rows), trainer.student(rows)).mean())

    before = fixed_loss()
    trainer.run()
    after = fixed_loss()
    assert after < 0.9 * before, (before, after)
    resumed = Trainer(dataclasses.replace(cfg, steps=45), _tiny_setup())
    assert resumed.resume() and resumed.step == 40
    for name, p in trainer.student.params.items():  # resuming restores the trained weights exactly
        assert torch.equal(resumed.student.params[name], p)


SHIPPED = shipped_delta("smollm2-135m-skv")


@pytest.mark.skipif(SHIPPED is None, reason="no committed delta for smollm2-135m-skv")
def test_shipped_delta_targets_the_trained_tensors_and_is_small():
    info, weights = read_delta(SHIPPED)
    config = get_preset("smollm2-135m-skv")
    ranks = {w.shape[0] for n, w in weights.items() if n.endswith(":lora_a")}
    assert len(ranks) <= 1
    rank = ranks.pop() if ranks else 0
    assert set(info.tensors) == set(trainable_names(config, rank)) | set(adapted_names(config, rank))
    assert SHIPPED.stat().st_size <= 20 * 2**20


# The full eval (24 held-out conversations, int8 serving path) measured the untrained conversion at
# 1.2% top-1 / KL 8.49 and the committed delta (layerwise 300 + KL 900 + widened KL 520 steps) at
# 54.2% / 1.08 (BENCHMARKS.md). On this 3-conversation slice: untrained 1.3% / 8.45, delta 52.2% / 1.08
# (the previous, KL-900-step delta: 43.7% / 1.42). The bounds leave margin for other CPUs' rounding
# yet fail for the untrained conversion and for that older delta.
SLICE_MIN_TOP1 = 0.46
SLICE_MAX_KL = 1.35


@pytest.mark.slow
@pytest.mark.skipif(SHIPPED is None, reason="no committed delta for smollm2-135m-skv")
def test_shipped_delta_applies_on_load_and_beats_the_untrained_conversion(smollm2_fp32):
    from model.distill.evaluate import eval_sequences
    from model.distill.train import preset_state
    from model.loader import load
    from model.quality import compare

    config, base = preset_state("smollm2-135m-skv")
    loaded = load("smollm2-135m-skv").model  # the loader applies the committed delta by itself
    plain = build(config, base)
    plain_state = plain.state_dict()
    changed = {n.rsplit(".", 1)[0] for n, t in loaded.state_dict().items() if not torch.equal(t, plain_state[n])}
    info, _ = read_delta(SHIPPED)
    fused = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
             "up_proj": "gate_up_proj"}  # the served model fuses these projections

    def served_module(name: str) -> str:
        head, _, leaf = name.removesuffix(".weight").rpartition(".")
        return f"{head}.{fused.get(leaf, leaf)}" if head else leaf

    assert changed == {served_module(n) for n in info.tensors}  # exactly what the delta names changed ...
    q_every_layer = {f"layers.{i}.self_attn.qkv_proj" for i in range(config.n_layers)}
    assert q_every_layer <= changed  # ... Q in every layer among them
    short, _ = eval_sequences("smollm2-135m", n_short=3, n_long=0)
    teacher = smollm2_fp32.model  # load("smollm2-135m", quant=QuantConfig.off()), once a session (tests/conftest.py)
    got = compare(teacher, loaded, short)
    untrained = compare(teacher, plain, short)
    assert got.kl < untrained.kl and got.top1 > untrained.top1
    assert got.top1 >= SLICE_MIN_TOP1 and got.kl <= SLICE_MAX_KL, got


def test_in_window_weight_scores_positions_past_the_window(tmp_path):
    """--in-window-weight: positions inside the local window weigh w, those past it 1 (0: only past it, whose
    logits alone are computed); a windowed student learns the positions a long row takes past its window."""
    setup = _tiny_setup()
    window = 24  # skv-tiny's local layers
    cfg = TrainConfig(steps=30, batch=4, seq_len=32, long_seq_len=40, lr=3e-3, objective="kl", in_window_weight=0.0,
                      eval_every=30, out=str(tmp_path / "run"))
    trainer = Trainer(cfg, setup)
    assert trainer.window == window
    with torch.no_grad():  # logits_from: the same logits for the positions it keeps
        rows = trainer.rows[:8]
        assert torch.allclose(trainer.student(rows, logits_from=window), trainer.student(rows)[:, window:], atol=1e-5)
    for w in (0.0, 0.5, 1.0):  # the loss is the w-weighted mean of the per-position KL
        trainer.cfg.in_window_weight = w
        trainer.gen.manual_seed(7)
        with torch.no_grad():
            got = float(trainer.loss(long=False))
            idx = torch.randint(0, len(trainer.rows), (cfg.batch,), generator=torch.Generator().manual_seed(7))
            kl = kl_per_token(trainer.teacher(trainer.rows[idx]), trainer.student(trainer.rows[idx]))
        weights = torch.ones(kl.shape[1])
        weights[:window] = w
        assert got == pytest.approx(float((kl * weights).sum(-1).mean() / weights.sum()), rel=1e-4), w
    trainer.cfg.in_window_weight = 0.0

    def past_kl() -> float:
        with torch.no_grad():
            return float(kl_per_token(trainer.teacher(rows, logits_from=window),
                                      trainer.student(rows, logits_from=window)).mean())

    before = past_kl()
    trainer.run()
    after = past_kl()
    assert after < 0.9 * before, (before, after)
    assert {"short_top1", "long_top1", "past_top1", "past_kl"} <= set(trainer.curve.points[-1])
    with pytest.raises(ValueError, match="no row is longer"):  # w == 0 needs rows longer than the window
        Trainer(dataclasses.replace(cfg, seq_len=16, long_seq_len=24), _tiny_setup())
    with pytest.raises(ValueError, match="kl"):
        TrainConfig(objective="layerwise", in_window_weight=0.5)
    with pytest.raises(ValueError, match="plain_tokens"):  # no chat rows and no plain text: nothing to train on
        TrainConfig(train_sets=0)
    TrainConfig(train_sets=0, plain_tokens=1000)  # plain text only: no teacher sampling
