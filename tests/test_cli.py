"""The ``pdserve`` command as a user runs it."""
import subprocess
import sys

import pytest


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "pdserve.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_generate_streams_a_chat_answer_on_the_default_preset():
    out = run("generate", "--chat", "--max-tokens", "12", "What is the capital of France?")
    assert out.returncode == 0, out.stderr
    assert "smollm2-135m, w8-a8-kv8" in out.stderr
    assert len(out.stdout.strip()) > 0
    assert "tok/s" in out.stderr and "finish: " in out.stderr


@pytest.mark.slow
def test_generate_float32_greedy_answers_the_question():
    out = run("generate", "--chat", "--precision", "float32", "--max-tokens", "12", "What is the capital of France?")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


@pytest.mark.parametrize("args, message", [
    (("generate", "--model", "nope", "hi"), "unknown model preset 'nope'"),
    (("generate", "--max-tokens", "0", "hi"), "invalid sampling parameter max_tokens=0"),
    (("generate", "--top-p", "0", "hi"), "invalid sampling parameter top_p=0.0"),
    (("generate", "--temperature", "-1", "hi"), "invalid sampling parameter temperature=-1.0"),
    (("generate", "--model", "llama3-70b", "hi"), "analytic config"),
    (("generate", "--cluster", "--precision", "float32", "hi"), "the cluster ships int8 KV"),
])
def test_bad_arguments_exit_2_with_a_message(args, message, capsys):
    """In this process (the command's main, ~3 s less a case than a fresh interpreter importing torch); the
    exit status through `python -m pdserve.cli` is checked once below."""
    from pdserve.cli import main

    assert main(list(args)) == 2
    assert message in capsys.readouterr().err


def test_a_bad_argument_exits_2_from_the_command():
    out = run("generate", "--model", "nope", "hi")
    assert out.returncode == 2
    assert "unknown model preset 'nope'" in out.stderr


@pytest.mark.slow
def test_generate_through_the_local_cluster():
    out = run("generate", "--cluster", "--chat", "--max-tokens", "12", "What is the capital of France?")
    assert out.returncode == 0, out.stderr
    assert "1 prefill + 1 decode worker" in out.stderr
    assert "Paris" in out.stdout


@pytest.mark.slow
def test_quick_start_embedded_chat_over_grpc(default_server):
    """The README quick start's main command: up + a two-turn chat over gRPC + down. Its chat runs, as written,
    against the session's server of the default model (tests/conftest.py: `pdserve up --port 0`, exactly the
    server `--embedded` starts; `up` and `down` go through the same start_background / stop_pid); what
    `--embedded` adds around the chat is checked below, without a second server of a minute's start-up."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    line = next(x for x in readme.splitlines() if x.startswith("pip install -e . && ") and "pdserve chat" in x)
    args = __import__("shlex").split(line.split("&& pdserve ", 1)[1])
    assert args[:2] == ["chat", "--embedded"]
    assert default_server.state["model"] == "smollm2-135m"  # the default: no --model in the command
    out = run(args[0], "--server", default_server.target, *args[2:], "--max-tokens", "16", timeout=400)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout and "Rome" in out.stdout
    assert len(re.findall(r"generated, finish: ", out.stderr)) == 2


@pytest.mark.parametrize("fails", [False, True])
def test_chat_embedded_starts_a_default_server_and_always_stops_it(monkeypatch, fails):
    """`pdserve chat --embedded`: `up` of the default model on a free port in a temporary state file, the chat
    against that server, then `down` of exactly its PID, even when the chat fails."""
    from pathlib import Path

    from pdserve import cli, server_cli
    from pdserve.server import ServerState

    calls = []

    def start_background(up_args, state_file, timeout_s):
        calls.append(("up", up_args.model, up_args.port, up_args.config, up_args.address,
                      getattr(up_args, "http_port", None)))
        assert not Path(state_file).exists() and Path(state_file).parent.is_dir()
        return ServerState(pid=424242, target="127.0.0.1:45678", metrics_port=0, model="smollm2-135m")

    def chat_session(client, args):
        calls.append(("chat", args.server, args.message, args.max_tokens))
        if fails:
            raise RuntimeError("chat failed")
        return 0

    monkeypatch.setattr(server_cli, "start_background", start_background)
    monkeypatch.setattr(server_cli, "chat_session", chat_session)
    monkeypatch.setattr(server_cli, "stop_pid", lambda pid, *a, **k: calls.append(("down", pid)) or [])
    if fails:
        with pytest.raises(RuntimeError, match="chat failed"):
            cli.main(["chat", "--embedded", "-m", "hi", "-m", "again", "--max-tokens", "5"])
    else:
        assert cli.main(["chat", "--embedded", "-m", "hi", "-m", "again", "--max-tokens", "5"]) == 0
    assert calls == [("up", None, 0, None, None, None), ("chat", "127.0.0.1:45678", ["hi", "again"], 5),
                     ("down", 424242)]
