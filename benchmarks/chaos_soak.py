"""The chaos soak as a benchmark script (the same as ``pdserve chaos soak``; see ``pdserve.chaos``):
Poisson load on a local cluster while a random worker or the store is killed every few seconds.

    python -m benchmarks.chaos_soak [--seconds 120] [--rate 2] [--kill-every 8] [--n-prefill 1]
                                    [--n-decode 1] [--max-tokens 32] [--max-prompt 96] [--admission-wait 10]
                                    [--stuck-every 0] [--stall-timeout 20] [--json]
"""
from __future__ import annotations

import argparse
import sys

from pdserve.chaos import add_soak_args, soak

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_soak_args(ap)
    sys.exit(soak(ap.parse_args()))
