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


# -- one server of the default model for the whole session ---------------------------------------------------------
# `pdserve up --port 0` with no model and no config: the server `pdserve chat --embedded` starts (the README quick
# start), shared by the tests that need a server of the default model (tests/test_cli.py's quick start,
# tests/test_dashboard.py): starting one takes a minute or more on a 2-core machine. Its users run back to back
# (pytest_collection_modifyitems below) and it is stopped (`pdserve down`, its own PID) after the last of them,
# so it never idles beside the rest of the suite.
DEFAULT_SERVER = "default_server"
_default_server = {}


def _uses_default_server(item) -> bool:
    return DEFAULT_SERVER in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(session, config, items):
    """The users of the shared server move next to the last module that uses it (order otherwise kept)."""
    users = [i for i in items if _uses_default_server(i)]
    if len({i.module for i in users}) < 2:
        return
    last_module = users[-1].module
    anchor = next(i for i in users if i.module is last_module)
    moved = [i for i in users if i.module is not last_module]
    rest = [i for i in items if i not in moved]
    at = rest.index(anchor)
    items[:] = rest[:at] + moved + rest[at:]


def _stop_default_server():
    server = _default_server.pop("server", None)
    return None if server is None else server.down()


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """After the last test that uses the shared server (an error of that test's teardown if `down` fails)."""
    if "server" in _default_server and _uses_default_server(item):
        items = item.session.items
        later = items[items.index(item) + 1:] if item in items else []
        if not any(_uses_default_server(i) for i in later):
            out = _stop_default_server()
            assert out.returncode == 0, out.stdout + out.stderr


def pytest_sessionfinish(session, exitstatus):
    _stop_default_server()  # an interrupted session: the server still goes down


@pytest.fixture
def default_server(tmp_path_factory):
    """The shared `pdserve up` server of the default model (127.0.0.1, free ports): a gateway_server.Server,
    with ``base`` the HTTP API's URL."""
    if "error" in _default_server:  # as a failed session fixture would: its users fail at once, not retry
        raise _default_server["error"]
    if "server" not in _default_server:
        from gateway_server import Server

        try:
            s = Server(tmp_path_factory.mktemp("default-server"), up=("up", "--port", "0"))
        except BaseException as e:
            _default_server["error"] = e
            raise
        s.base = f"http://127.0.0.1:{s.state['http_port']}"
        _default_server["server"] = s
    return _default_server["server"]
