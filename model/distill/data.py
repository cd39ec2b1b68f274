"""Teacher data: chat completions sampled from the teacher on varied prompts, cached on disk.

The student must match the teacher on the text the teacher itself produces (that is what
it will be asked to continue when served), so the corpus is the teacher's own samples.
Long sequences (> the local window) are whole conversations chained turn after turn, so
the window layers see what they see in a long chat.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

CACHE_DIR = Path.home() / ".cache" / "pdserve" / "distill"
PACKAGED_DIR = Path(__file__).resolve().parent / "sets"  # the eval set ships: same tokens on every machine

_TASKS = [
    "Explain {t} to a ten-year-old.", "Write a short poem about {t}.", "Give me three facts about {t}.",
    "What are the pros and cons of {t}?", "Write a short story that involves {t}.",
    "Summarize the history of {t} in a paragraph.", "How would I get started with {t}?",
    "Write a Python function related to {t}, with a docstring.", "What is a common misconception about {t}?",
    "Compare {t} with something similar and explain the difference.",
]
_TRAIN_TOPICS = [
    "volcanoes", "the French revolution", "black holes", "gardening", "machine learning", "coffee",
    "the stock market", "honey bees", "chess", "climate change", "the Roman empire", "electric cars",
    "sleep", "jazz music", "prime numbers", "the human heart", "recycling", "the internet", "sourdough bread",
    "photosynthesis", "bicycles", "the moon landing", "sorting algorithms", "dinosaurs", "meditation",
    "rainforests", "the printing press", "vaccines", "origami", "football", "databases", "whales",
]
_EVAL_TOPICS = ["glaciers", "ancient Egypt", "quantum computers", "tea", "marathon running", "octopuses",
                "renewable energy", "the violin"]
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@dataclass(frozen=True)
class DataSpec:
    """Which prompts, how they are sampled: its hash names the cache file."""

    split: str  # "train" or "eval"
    n_prompts: int
    max_tokens: int = 200
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0

    def key(self, teacher: str) -> str:
        raw = json.dumps({"teacher": teacher, **self.__dict__}, sort_keys=True)
        return hashlib.sha256(raw.encode()).hexdigest()[:16]


def prompts(spec: DataSpec) -> list[str]:
    """Seeded task x topic prompts; train and eval use disjoint topics."""
    topics = _TRAIN_TOPICS if spec.split == "train" else _EVAL_TOPICS
    rng = random.Random(f"{spec.split}-{spec.seed}")
    pairs = [(task, topic) for topic in topics for task in _TASKS]
    rng.shuffle(pairs)
    if spec.n_prompts > len(pairs):
        raise ValueError(f"n_prompts={spec.n_prompts} exceeds the {len(pairs)} {spec.split} prompts")
    return [task.format(t=topic) for task, topic in pairs[:spec.n_prompts]]


def sample_conversations(teacher, tokenizer, spec: DataSpec) -> list[list[int]]:
    """Prompt + sampled completion (+ end of turn) per prompt, as token ids."""
    from model.engine import Engine, EngineConfig, SamplingParams

    chats = [tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM},
                                            {"role": "user", "content": p}]) for p in prompts(spec)]
    ids = [tokenizer.encode(c) for c in chats]
    params = [SamplingParams(max_tokens=spec.max_tokens, temperature=spec.temperature, top_p=spec.top_p,
                             seed=spec.seed * 100003 + i) for i in range(len(ids))]
    engine = Engine(teacher, EngineConfig(max_batched_tokens=4096, max_seqs=128), tokenizer)
    end = tokenizer.token_id("<|im_end|>")
    outs = engine.generate(ids, params)
    return [p + o + ([end] if end is not None else []) + tokenizer.encode("\n") for p, o in zip(ids, outs)]


def chain(seqs: list[list[int]], length: int) -> list[list[int]]:
    """Whole conversations concatenated into sequences of exactly ``length`` tokens (the rest dropped)."""
    flat = [t for s in seqs for t in s]
    return [flat[i:i + length] for i in range(0, len(flat) - length + 1, length)]


def load_or_sample(teacher_name: str, spec: DataSpec, cache_dir: Path = CACHE_DIR) -> list[list[int]]:
    """Cached conversations for ``spec``; sampled from the teacher on a miss."""
    name = f"{spec.split}-{spec.key(teacher_name)}.json"
    for path in (PACKAGED_DIR / name, Path(cache_dir) / name):
        if path.is_file():
            return json.loads(path.read_text())["sequences"]
    from model.config import QuantConfig
    from model.loader import load

    t = load(teacher_name, quant=QuantConfig.off())
    if t.tokenizer is None:
        raise ValueError(f"teacher {teacher_name!r} has no tokenizer to build chat prompts")
    seqs = sample_conversations(t.model, t.tokenizer, spec)
    path = Path(cache_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"teacher": teacher_name, "spec": spec.__dict__, "sequences": seqs}))
    return seqs


def as_batches(seqs: list[list[int]], seq_len: int) -> torch.Tensor:
    """[n, seq_len] training rows: sequences chained and cut, so no position is padding."""
    rows = chain(seqs, seq_len)
    if not rows:
        raise ValueError(f"data holds {sum(map(len, seqs))} tokens: too few for one row of seq_len={seq_len}")
    return torch.tensor(rows, dtype=torch.long)
