"""int8 quality on SmolLM2: teacher-forced top-1 agreement and KL against fp32, per quantization choice.

    python benchmarks/int8_quality.py [--json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json

from model.config import QuantConfig
from model.loader import load
from model.quality import compare
from model.texts import EVAL

VARIANTS = {
    "w8-a8-kv8, rotation (default)": QuantConfig(),
    "w8-a8-kv8, rotation + smoothing 0.5": QuantConfig(smooth_alpha=0.5),
    "w8-a8-kv8, smoothing 0.5 only": QuantConfig(rotate=False, smooth_alpha=0.5),
    "w8-a8-kv8, neither": QuantConfig(rotate=False, smooth_alpha=None),
    "w8-kv8 (float activations)": QuantConfig(activations=False),
    "kv8 only": QuantConfig(weights=False, activations=False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    as_json = parser.parse_args().json
    ref = load("smollm2-135m", quant=QuantConfig.off())
    seqs = [ref.tokenizer.encode(t) for t in EVAL]
    rows = []
    for name, quant in VARIANTS.items():
        result = compare(ref.model, load("smollm2-135m", quant=quant).model, seqs)
        rows.append({"variant": name, **dataclasses.asdict(result)})
        if not as_json:
            print(f"{name:40} top-1 {result.top1:6.1%}  KL {result.kl:.4f}  ({result.tokens} positions)", flush=True)
    if as_json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
