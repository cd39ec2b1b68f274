"""Plain text to distill on: documents the teacher did not write, scored by one forward pass.

The teacher's chat samples teach the student what the teacher says; they do not teach it text
the teacher only reads, and a student trained on them alone failed on such text (issue 19).
Documents cost no sampling (the teacher's logits on them are one forward pass), so this source
is cheap. It reads the Python sources and docstrings of packages that pdserve's own install
brings (jinja2, tqdm, networkx, sympy, gguf) in site-packages, never the standard library or
the OS's ``/usr/share``: evaluations draw on those (``model.general_text``). Packages vendor
stdlib code and license texts now and then, so every row that shares a run of
``OVERLAP_TOKENS`` tokens with the general-text eval is dropped as well.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path

from model.general_text import passages, shingles

PACKAGES = ("jinja2", "tqdm", "networkx", "sympy", "gguf")
OVERLAP_TOKENS = 12
SKIP_NAMES = ("LICENSE", "COPYING", "NOTICE")


def forbidden_roots() -> tuple[Path, ...]:
    """Trees no training text may come from: the standard library (its own files) and /usr/share."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve(), Path("/usr/share").resolve()


def source_files(site_packages: Path | None = None) -> list[Path]:
    """The packages' .py files in a fixed order, none under a forbidden root (a venv-less install keeps
    site-packages inside the stdlib tree, so site-packages itself is what's allowed there)."""
    site = (site_packages or Path(sysconfig.get_paths()["purelib"])).resolve()
    out = []
    for pkg in PACKAGES:
        for path in sorted((site / pkg).rglob("*.py")):
            path = path.resolve()
            inside_site = site in path.parents
            forbidden = any(root in path.parents for root in forbidden_roots()) and not inside_site
            if not forbidden and not any(s in path.name.upper() for s in SKIP_NAMES):
                out.append(path)
    return out


def plain_text_sequences(encode, n_tokens: int, row_tokens: int = 256) -> list[list[int]]:
    """About ``n_tokens`` tokens of package source, in rows of ``row_tokens``, none overlapping the eval."""
    short, long = passages(encode)
    held_out = set().union(*(shingles(p.tokens, OVERLAP_TOKENS) for p in short + long))
    rows: list[list[int]] = []
    for path in source_files():
        ids = encode(path.read_text(encoding="utf-8", errors="replace"))
        for i in range(0, len(ids) - row_tokens + 1, row_tokens):
            row = ids[i:i + row_tokens]
            if not shingles(row, OVERLAP_TOKENS) & held_out:
                rows.append(row)
            if len(rows) * row_tokens >= n_tokens:
                return rows
    if not rows:
        raise ValueError(f"no plain text found in site-packages for {', '.join(PACKAGES)}")
    return rows
