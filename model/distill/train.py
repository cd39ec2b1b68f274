"""The distillation loop: layer-wise warm-up, then end-to-end KL(teacher || student), resumable.

Only the smallest tensor set trains: K/V of the KV-producing layers (mean-pooled MQA
changed them) and Q of every layer (each now reads one pooled, possibly borrowed, K/V).
With ``widen_rank`` > 0 the rest of each layer adapts too, cheaply in bytes: the norms in
full and o_proj and the MLP through rank-``widen_rank`` adapters. Everything else stays
the published weights, so the delta stays small.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from model.config import ModelConfig, QuantConfig
from model.distill.data import CACHE_DIR, DataSpec, as_batches, chain, load_or_sample
from model.distill.layerwise import capture, layerwise_loss
from model.distill.delta import base_name
from model.distill.student import LORA_A, FunctionalModel, kl_per_token


@dataclass
class TrainConfig:
    teacher: str = "smollm2-135m"
    student: str = "smollm2-135m-skv"
    steps: int = 200
    batch: int = 4
    seq_len: int = 256
    lr: float = 5e-4
    objective: str = "layerwise"  # "layerwise" (cheap, teacher inputs) or "kl" (end to end)
    long_seq_len: int = 1280  # > the local window: every ``long_every``-th step trains on one such row
    long_every: int = 4
    eval_every: int = 25
    train_prompts: int = 160
    train_sets: int = 1  # sampled sets of the train prompts (seeds seed, seed+1, ...): more text, not more topics;
    # 0: no chat rows, so no teacher sampling (plain text only, needs plain_tokens)
    plain_tokens: int = 0  # + this many tokens of plain text (model.distill.plain_text): text the teacher only reads
    lr_schedule: str = "constant"  # or "cosine": down to lr_floor * lr at the last step
    lr_floor: float = 0.1
    in_window_weight: float = 1.0  # KL objective: loss weight of positions < the local window vs those past it
    # (1: a plain mean; 0: only positions >= the window count, and only their logits are computed)
    widen_rank: int = 0  # > 0: also train the norms and rank-r adapters on o_proj and the MLP
    widen_lr_scale: float = 4.0  # their learning rate relative to ``lr`` (adapters start at zero)
    seed: int = 0
    device: str = "cpu"
    out: str = str(CACHE_DIR / "run")

    def __post_init__(self) -> None:
        if self.objective not in ("layerwise", "kl"):
            raise ValueError(f"objective must be 'layerwise' or 'kl', got {self.objective!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.plain_tokens < 0:
            raise ValueError(f"distill config: plain_tokens must be >= 0, got {self.plain_tokens}")
        for name in ("steps", "batch", "seq_len", "long_seq_len", "long_every", "eval_every", "train_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"distill config: {name} must be positive, got {getattr(self, name)}")
        if self.train_sets < 0 or (self.train_sets == 0 and not self.plain_tokens):
            raise ValueError(f"distill config: train_sets must be positive, or 0 with plain_tokens > 0 "
                             f"(plain text only), got {self.train_sets}")
        if not 0 <= self.in_window_weight <= 1:
            raise ValueError(f"distill config: in_window_weight must be in [0, 1], got {self.in_window_weight}")
        if self.in_window_weight != 1 and self.objective != "kl":
            raise ValueError("distill config: in_window_weight applies to the 'kl' objective only")
        if self.widen_rank < 0:
            raise ValueError(f"distill config: widen_rank must be >= 0, got {self.widen_rank}")
        if not self.lr > 0:
            raise ValueError(f"distill config: lr must be positive, got {self.lr}")


@dataclass
class Curve:
    """One line per eval: the figures BENCHMARKS.md plots against training time."""

    points: list[dict] = field(default_factory=list)

    def add(self, **kw) -> None:
        self.points.append(kw)


ADAPTED = ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def local_window(config: ModelConfig) -> int | None:
    """The smallest local-layer window: positions at or past it are where a windowed student can differ."""
    windows = [spec.window for spec in config.layers if spec.window is not None]
    return min(windows) if windows else None


def trainable_names(config: ModelConfig, widen_rank: int = 0) -> tuple[str, ...]:
    """Tensors trained (and shipped) whole."""
    names = []
    for i in range(config.n_layers):
        names.append(f"layers.{i}.self_attn.q_proj.weight")
        if config.produces_kv(i):
            names += [f"layers.{i}.self_attn.k_proj.weight", f"layers.{i}.self_attn.v_proj.weight"]
        if widen_rank:
            names += [f"layers.{i}.input_layernorm.weight", f"layers.{i}.post_attention_layernorm.weight"]
    return tuple(names + (["norm.weight"] if widen_rank else []))


def adapted_names(config: ModelConfig, widen_rank: int) -> dict[str, int]:
    """Tensors trained through a low-rank adapter, with its rank."""
    if not widen_rank:
        return {}
    return {f"layers.{i}.{m}.weight": widen_rank for i in range(config.n_layers) for m in ADAPTED}


def preset_state(name: str, seed: int = 0) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A preset's config and float weights as published (a shared-KV preset: converted, no delta)."""
    from model.convert import to_shared_kv
    from model.loader import random_state
    from model.presets import get_preset
    from model.weights import load_gguf, smollm2_gguf_path

    config = get_preset(name)
    if config.weights is None:
        return config, random_state(config, seed)
    state = load_gguf(smollm2_gguf_path()).tensors
    return config, to_shared_kv(state, config) if config.weights == "smollm2:skv" else state


@dataclass
class Setup:
    """Everything a run trains on: both models' float weights and the teacher's token sequences."""

    teacher: ModelConfig
    teacher_state: dict[str, torch.Tensor]
    student: ModelConfig
    student_base: dict[str, torch.Tensor]
    train_seqs: list[list[int]]
    eval_seqs: list[list[int]]

    @classmethod
    def from_presets(cls, cfg: TrainConfig) -> "Setup":
        tcfg, tstate = preset_state(cfg.teacher)
        scfg, sstate = preset_state(cfg.student)
        train = [seq for s in range(cfg.train_sets)
                 for seq in load_or_sample(cfg.teacher, DataSpec("train", cfg.train_prompts, seed=cfg.seed + s))]
        evals = load_or_sample(cfg.teacher, DataSpec("eval", 24, seed=1))
        if cfg.plain_tokens:
            from model.distill.plain_text import plain_text_sequences
            from model.loader import load

            tokenizer = load(cfg.teacher, quant=QuantConfig.off()).tokenizer
            if tokenizer is None:
                raise ValueError(f"teacher {cfg.teacher!r} has no tokenizer to encode plain text")
            plain = plain_text_sequences(tokenizer.encode, cfg.plain_tokens, cfg.seq_len)
            train = [seq for pair in zip(train, plain) for seq in pair] + train[len(plain):] + plain[len(train):]
        return cls(tcfg.with_quant(QuantConfig.off()), tstate, scfg, sstate, train, evals)


def seed_from_delta(setup: Setup, weights: dict[str, torch.Tensor], widen_rank: int) -> dict[str, torch.Tensor]:
    """Start a run from a delta: its whole tensors replace the base; its adapter factors are returned
    to seed this run's adapters. Refuses a delta with tensors this run would not write back out."""
    whole = {n: w for n, w in weights.items() if n == base_name(n)}
    factors = {n: w for n, w in weights.items() if n != base_name(n)}
    lost = sorted((set(whole) - set(trainable_names(setup.student, widen_rank)))
                  | ({base_name(k) for k in factors} - set(adapted_names(setup.student, widen_rank))))
    if lost:
        raise ValueError(f"it changes {lost[0]} (and {len(lost) - 1} more), which a run with widen_rank="
                         f"{widen_rank} does not train: the result would lose them")
    ranks = {w.shape[0] for k, w in factors.items() if k.endswith(LORA_A)}
    if ranks and ranks != {widen_rank}:
        raise ValueError(f"its adapters have rank {sorted(ranks)}, the run widen_rank={widen_rank}")
    setup.student_base = {**setup.student_base, **whole}
    return factors


class Trainer:
    def __init__(self, cfg: TrainConfig, setup: Setup, progress=None):
        self.cfg, self.progress = cfg, progress
        torch.manual_seed(cfg.seed)
        self.base = setup.student_base
        self.teacher = FunctionalModel(setup.teacher, setup.teacher_state, device=cfg.device)
        self.student = FunctionalModel(setup.student, self.base, trainable_names(setup.student, cfg.widen_rank),
                                       device=cfg.device, lowrank=adapted_names(setup.student, cfg.widen_rank))
        core = set(trainable_names(setup.student))
        groups = {True: [], False: []}
        for name, p in self.student.named_trainables():
            groups[name in core].append(p)
        self.opt = torch.optim.Adam([{"params": groups[True], "lr_scale": 1.0},
                                     {"params": groups[False], "lr_scale": cfg.widen_lr_scale}], lr=cfg.lr)
        self.step, self.seconds, self.curve = 0, 0.0, Curve()
        self.window = local_window(setup.student)
        if cfg.in_window_weight != 1:
            if self.window is None:
                raise ValueError(f"in_window_weight: student {setup.student.name!r} has no local layers")
            if cfg.in_window_weight == 0 and max(cfg.seq_len, cfg.long_seq_len) <= self.window:
                raise ValueError(f"in_window_weight=0 trains only positions >= the window ({self.window}), "
                                 f"but no row is longer (seq_len {cfg.seq_len}, long_seq_len {cfg.long_seq_len})")
        self.rows = as_batches(setup.train_seqs, cfg.seq_len).to(cfg.device)
        self.long_rows = as_batches(setup.train_seqs, cfg.long_seq_len).to(cfg.device)
        evals = setup.eval_seqs
        self.eval_rows = [torch.tensor(s, device=cfg.device) for s in evals[:6]]
        self.eval_rows.append(torch.tensor(chain(evals, cfg.long_seq_len)[0], device=cfg.device))
        with torch.no_grad():
            self.eval_logits = [self.teacher(r[None])[0] for r in self.eval_rows]
        self.targets = self.long_targets = None
        if cfg.objective == "layerwise":
            self.targets = capture(self.teacher, self.rows)
            self.long_targets = capture(self.teacher, self.long_rows, batch=1)
        self.gen = torch.Generator().manual_seed(cfg.seed)

    def loss(self, long: bool) -> torch.Tensor:
        rows = self.long_rows if long else self.rows
        idx = torch.randint(0, len(rows), (1 if long else self.cfg.batch,), generator=self.gen)
        if self.cfg.objective == "layerwise":
            return layerwise_loss(self.student, self.long_targets if long else self.targets, idx.to(rows.device))
        batch = rows[idx.to(rows.device)]
        w = self.cfg.in_window_weight
        start = self.window if w == 0 and batch.shape[1] > self.window else 0  # logits from here on only
        with torch.no_grad():
            t = self.teacher(batch, logits_from=start)
        kl = kl_per_token(t, self.student(batch, logits_from=start))
        if w == 1 or start:
            return kl.mean()
        weights = torch.ones(kl.shape[1], device=kl.device)
        weights[:self.window] = w
        if not weights.sum() > 0:  # a row inside the window with w == 0: nothing to learn from it
            return (kl * 0).sum()
        return (kl * weights).sum(-1).mean() / weights.sum()

    def seed_adapters(self, factors: dict[str, torch.Tensor]) -> None:
        """Adapter factors from ``seed_from_delta`` instead of the zero start."""
        for name, w in factors.items():
            self.student.param(name).data.copy_(w.float())

    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        if cfg.lr_schedule == "constant":
            return cfg.lr
        frac = min(step / cfg.steps, 1.0)
        return cfg.lr * (cfg.lr_floor + (1 - cfg.lr_floor) * 0.5 * (1 + math.cos(math.pi * frac)))

    def train_step(self) -> float:
        t0 = time.perf_counter()
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step) * group["lr_scale"]
        long = self.step % self.cfg.long_every == self.cfg.long_every - 1
        loss = self.loss(long)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step += 1
        self.seconds += time.perf_counter() - t0
        return float(loss.detach())

    @torch.no_grad()
    def quick_eval(self) -> dict:
        """Fake-quant student vs teacher on a fixed slice: 6 short conversations and one long row (and, for a
        windowed student, that row's positions past the window apart)."""
        logits = [self.student(row[None])[0] for row in self.eval_rows]
        parts = {"short": (logits[:-1], self.eval_logits[:-1]), "long": (logits[-1:], self.eval_logits[-1:])}
        if self.window is not None and len(self.eval_rows[-1]) > self.window:
            parts["past"] = ([logits[-1][self.window:]], [self.eval_logits[-1][self.window:]])
        res = {}
        for name, (students, teachers) in parts.items():
            agree = kl = n = 0.0
            for s, t in zip(students, teachers):
                agree += float((s.argmax(-1) == t.argmax(-1)).sum())
                kl += float(kl_per_token(t, s).sum())
                n += len(t)
            res[name] = {"top1": agree / n, "kl": kl / n}
        return res

    def run(self) -> Curve:
        while self.step < self.cfg.steps:
            loss = self.train_step()
            if self.step % self.cfg.eval_every == 0 or self.step == self.cfg.steps:
                ev = self.quick_eval()
                self.curve.add(step=self.step, seconds=round(self.seconds, 1), loss=loss,
                               objective=self.cfg.objective, **{f"{k}_{m}": v[m] for k, v in ev.items()
                                                                for m in ("top1", "kl")})
                self.save()
            if self.progress:
                self.progress(self, loss)
        return self.curve

    # -- checkpoints (safetensors + json, never pickle) ---------------------------------------
    def save(self) -> None:
        from safetensors.torch import save_file

        out = Path(self.cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {f"param/{n}": p.detach().cpu() for n, p in self.student.params.items()}
        for n, p in self.student.params.items():
            st = self.opt.state.get(p, {})
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    tensors[f"{k}/{n}"] = st[k].cpu()
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "checkpoint.safetensors"))
        state = {"step": self.step, "seconds": self.seconds, "curve": self.curve.points, "config": asdict(self.cfg),
                 "adam_step": {n: float(self.opt.state[p]["step"]) for n, p in self.student.params.items()
                               if p in self.opt.state}}
        (out / "state.json").write_text(json.dumps(state, indent=1))

    def resume(self) -> bool:
        """Continue from ``<out>``'s checkpoint, optimizer moments included; False if there is none."""
        from safetensors.torch import load_file

        out = Path(self.cfg.out)
        if not (out / "checkpoint.safetensors").is_file():
            return False
        tensors = load_file(str(out / "checkpoint.safetensors"))
        state = json.loads((out / "state.json").read_text())
        for n, p in self.student.params.items():
            p.data.copy_(tensors[f"param/{n}"])
            if f"exp_avg/{n}" in tensors:
                self.opt.state[p] = {"step": torch.tensor(state["adam_step"][n]),
                                     "exp_avg": tensors[f"exp_avg/{n}"].to(p.device),
                                     "exp_avg_sq": tensors[f"exp_avg_sq/{n}"].to(p.device)}
        self.step, self.seconds = state["step"], state["seconds"]
        self.curve = Curve(state["curve"])
        return True


def checkpoint_weights(out: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A run's state.json and its trained float tensors, without rebuilding the trainer."""
    from safetensors.torch import load_file

    out = Path(out)
    if not (out / "checkpoint.safetensors").is_file():
        raise FileNotFoundError(f"no checkpoint in {out}")
    tensors = load_file(str(out / "checkpoint.safetensors"))
    weights = {k.removeprefix("param/").replace("__", "."): v for k, v in tensors.items() if k.startswith("param/")}
    return json.loads((out / "state.json").read_text()), weights
