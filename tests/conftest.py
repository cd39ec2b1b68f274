import functools
import os

# Before anything imports Ray: otherwise a local Ray binds the machine's outside address.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@functools.cache
def smollm2(precision: str):
    """SmolLM2 loaded once per test session and precision ('float32' or 'int8')."""
    from model.config import QuantConfig
    from model.loader import load

    return load("smollm2-135m", quant=QuantConfig() if precision == "int8" else QuantConfig.off(precision))


@pytest.fixture(scope="session")
def smollm2_fp32():
    return smollm2("float32")


@pytest.fixture(scope="session")
def smollm2_int8():
    return smollm2("int8")


@pytest.fixture(scope="session")
def smollm2_gguf():
    from model.weights import smollm2_gguf_path

    return smollm2_gguf_path()
