"""What the decode worker's publishing costs: the same requests decoded with ``publish`` off and on (each block
a running request fills goes to the store, and its whole conversation at the end), with an in-process store;
prints the decode time and the bytes the store took in.

    python -m benchmarks.decode_publish [--model smollm2-135m] [--context 2048] [--requests 4]
                                        [--max-tokens 256] [--runs 2]

One torch thread. To compare two trees, run it from each with ``PYTHONPATH=<tree>``.
"""
from __future__ import annotations

import argparse
import os


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()

    import torch

    import decode.worker as decode_module
    from benchmarks.common import decode_handoffs, in_process_prefill
    from model.config import QuantConfig
    from model.engine import EngineConfig, SamplingParams
    from model.loader import load

    torch.set_num_threads(1)
    print(f"tree: {os.path.dirname(os.path.dirname(decode_module.__file__))}")
    model = load(args.model, quant=QuantConfig()).model
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    vocab = model.config.vocab_size - 10
    for run in range(args.runs):
        for publish in (False, True) if run % 2 == 0 else (True, False):
            store, prefill, fp = in_process_prefill(model, EngineConfig(max_seqs=8))
            prompts = [[(run * 13 + i * 7 + j) % vocab + 10 for j in range(args.context)] for i in range(args.requests)]
            handoffs = [prefill.prefill(f"r{i}", p, params) for i, p in enumerate(prompts)]
            prefilled = store.stats.bytes_in
            worker = decode_module.DecodeWorker("d", model, store, fp, EngineConfig(max_seqs=8), publish=publish)
            elapsed = decode_handoffs(worker, handoffs, params)
            worker.shutdown()
            print(f"run {run + 1} publish {'on ' if publish else 'off'}: decode {elapsed:.2f} s, store took in "
                  f"{(store.stats.bytes_in - prefilled) / 1e6:.0f} MB from decode (+{prefilled / 1e6:.0f} MB from "
                  f"prefill), publish failures {worker.publish_failures}", flush=True)


if __name__ == "__main__":
    main()
