"""Regenerates the committed stubs: ``python -m protos.generate [OUT_DIR]``.

Compiled with the repository root as the include path, so the generated import line is
``from protos.pdserve.v1 import pdserve_pb2`` (see ``protos/__init__.py``).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = "protos/pdserve/v1/pdserve.proto"


def generate(out_dir: Path = ROOT) -> list[Path]:
    """Writes ``protos/pdserve/v1/pdserve_pb2{,_grpc}.py`` under ``out_dir``; returns their paths."""
    from grpc_tools import protoc

    out_dir = Path(out_dir)
    (out_dir / "protos/pdserve/v1").mkdir(parents=True, exist_ok=True)
    rc = protoc.main(["grpc_tools.protoc", f"-I{ROOT}", f"--python_out={out_dir}",
                      f"--grpc_python_out={out_dir}", str(ROOT / PROTO)])
    if rc != 0:
        raise RuntimeError(f"protoc failed on {PROTO} (exit {rc})")
    return [out_dir / "protos/pdserve/v1" / n for n in ("pdserve_pb2.py", "pdserve_pb2_grpc.py")]


if __name__ == "__main__":
    for p in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT):
        print(p)
