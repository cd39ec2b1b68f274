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
def test_bad_arguments_exit_2_with_a_message(args, message):
    out = run(*args)
    assert out.returncode == 2
    assert message in out.stderr


@pytest.mark.slow
def test_generate_through_the_local_cluster():
    out = run("generate", "--cluster", "--chat", "--max-tokens", "12", "What is the capital of France?")
    assert out.returncode == 0, out.stderr
    assert "1 prefill + 1 decode worker" in out.stderr
    assert "Paris" in out.stdout


@pytest.mark.slow
def test_quick_start_embedded_chat_over_grpc():
    """The README quick start's main command: up + a two-turn chat over gRPC + down."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    line = next(x for x in readme.splitlines() if x.startswith("pip install -e . && ") and "pdserve chat" in x)
    args = __import__("shlex").split(line.split("&& pdserve ", 1)[1])
    assert args[:2] == ["chat", "--embedded"]
    out = run(*args, "--max-tokens", "16", timeout=400)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout and "Rome" in out.stdout
    assert len(re.findall(r"generated, finish: ", out.stderr)) == 2
