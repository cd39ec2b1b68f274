"""General text for evaluation: prose, documentation and code that ship with Python and the OS.

The distillation's own eval is sampled from the teacher on prompts like those it trains on,
so a student can score well there and still fail on text nobody here wrote (issue 19 found
25% top-1 on such text where the chat eval said 54%). These passages come from files every
machine of ours has: the Python standard library (docstrings and code) and Debian's license
texts in ``/usr/share/common-licenses``. Nothing of them may enter training data: no training
source reads those trees, and tests/test_general_text.py checks the distillation sets against
these passages.

Short passages (< 1k tokens) never leave the local layers' window; long ones (2,048 tokens)
do, and the positions past ``window`` are reported apart, since only they exercise it.
"""
from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

SHORT_TOKENS = 384
LONG_TOKENS = 2048
LICENSES = Path("/usr/share/common-licenses")

# (root, relative path): short passages come from one set of files and long ones from another,
# so no token is counted twice.
SHORT_SOURCES = (
    ("stdlib", "textwrap.py"), ("stdlib", "heapq.py"), ("stdlib", "json/decoder.py"),
    ("stdlib", "fractions.py"), ("licenses", "Apache-2.0"), ("licenses", "MPL-2.0"),
)
LONG_SOURCES = (("stdlib", "argparse.py"), ("licenses", "GPL-3"))


@dataclass(frozen=True)
class Passage:
    source: str  # where the text came from, for reports
    tokens: list[int]


def source_path(root: str, rel: str) -> Path:
    base = Path(sysconfig.get_paths()["stdlib"]) if root == "stdlib" else LICENSES
    return base / rel


def read_source(root: str, rel: str) -> str:
    path = source_path(root, rel)
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        hint = "Debian's base-files package ships it" if root == "licenses" else "it ships with Python"
        raise FileNotFoundError(f"the general-text eval reads {path} ({hint}): {e.strerror}") from None


def passages(encode, short_tokens: int = SHORT_TOKENS, long_tokens: int = LONG_TOKENS) -> tuple[list[Passage], list[Passage]]:
    """(short, long) passages: the first ``short_tokens`` / ``long_tokens`` tokens of each source file.

    ``encode``: text -> token ids (the teacher's tokenizer; the text is plain, no chat template).
    """
    def cut(sources, n: int) -> list[Passage]:
        out = []
        for root, rel in sources:
            ids = encode(read_source(root, rel))
            if len(ids) < n:
                raise ValueError(f"{source_path(root, rel)} holds {len(ids)} tokens, fewer than the {n} needed")
            out.append(Passage(f"{root}:{rel}", ids[:n]))
        return out

    return cut(SHORT_SOURCES, short_tokens), cut(LONG_SOURCES, long_tokens)


def shingles(tokens: list[int], width: int) -> set[tuple[int, ...]]:
    """Every run of ``width`` consecutive tokens: two texts sharing none share no passage that long."""
    return {tuple(tokens[i:i + width]) for i in range(len(tokens) - width + 1)}
