"""Running the Triton kernel tests on CPU under Triton's interpreter, or on a GPU, for both kernel test modules.

``TRITON_INTERPRET=1`` must be in the environment before a kernel is decorated, i.e.
before ``kernels.triton_*`` is first imported; nothing else imports those modules. The
interpreter runs tl.dot in numpy: int8 and fp32 are exact there (bf16 dots are not
emulated faithfully), so the attention tests run fp32 queries over int8 KV.

On a GPU (``PDSERVE_TEST_DEVICE=cuda``, as the device session runs them) the same tests run
the compiled kernels: every CPU tensor a test hands a kernel is copied to the device, and
results and written-to arguments are copied back, so the references stay on the CPU.
Importing this skips the importing test module where the kernels cannot run.
"""
import os

DEVICE = os.environ.get("PDSERVE_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from kernels import triton_attention as _ta  # noqa: E402
from kernels import triton_gemm as _tg  # noqa: E402
from kernels import triton_kv as _tk  # noqa: E402

if DEVICE == "cpu" and type(_tg._w8a8_kernel).__name__ != "InterpretedFunction":  # tests hand kernels CPU tensors
    pytest.skip("the Triton kernels are compiled, not interpreted: TRITON_INTERPRET is not 1, or kernels.triton_*"
                " was imported before it was set", allow_module_level=True)
if DEVICE != "cpu" and not torch.cuda.is_available():
    pytest.skip(f"PDSERVE_TEST_DEVICE={DEVICE} but torch sees no CUDA device", allow_module_level=True)

cpu_only = pytest.mark.skipif(DEVICE != "cpu", reason="hands CPU tensors to the kernels through dispatch")


class _OnDevice:
    """A kernel module whose functions take CPU tensors: moved to DEVICE for the call, results and
    arguments (the kernels write some in place) copied back afterwards."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        f = getattr(self._module, name)
        if DEVICE == "cpu" or name.startswith("_") or not callable(f):
            return f

        def call(*args, **kwargs):
            moved = {}

            def to(x):
                if isinstance(x, torch.Tensor) and x.device.type == "cpu":
                    moved[id(x)] = (x, x.to(DEVICE))
                    return moved[id(x)][1]
                return x

            out = f(*map(to, args), **{k: to(v) for k, v in kwargs.items()})
            for orig, dev in moved.values():
                orig.copy_(dev.cpu())
            if isinstance(out, tuple):
                return tuple(o.cpu() for o in out)
            return out.cpu() if isinstance(out, torch.Tensor) else out

        return call


ta, tg, tk = _OnDevice(_ta), _OnDevice(_tg), _OnDevice(_tk)


def rand_int8(g, *shape):
    return torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)
