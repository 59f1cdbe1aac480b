"""End-to-end check of agent.backends.llamacpp_server with a tiny GGUF model.

Spawns the real llama.cpp server (in-process via xllamacpp) as a subprocess
on 127.0.0.1, waits for /health, runs a plain and a streamed chat completion
with the openai client, then sends SIGTERM and checks for a prompt exit 0.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("xllamacpp")
pytest.importorskip("gguf")
openai = pytest.importorskip("openai")

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
ALIAS = "tiny-llama"


def _load_tiny_gguf():
    # tests/ may or may not be a package: load the helper by path.
    spec = importlib.util.spec_from_file_location(
        "_tiny_gguf_helper", pathlib.Path(__file__).with_name("tiny_gguf.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _wait_healthy(proc: subprocess.Popen, port: int, stderr_path: pathlib.Path, timeout: float = 30.0) -> float:
    start = time.monotonic()
    deadline = start + timeout
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited early with {proc.returncode}: {stderr_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - start
        except urllib.error.HTTPError as e:  # 503 while the model loads
            last = e.code
        except OSError as e:  # connection refused before the socket is bound
            last = e
        time.sleep(0.02)
    pytest.fail(f"server not healthy within {timeout}s (last: {last!r})")


@pytest.fixture
def server(tmp_path):
    model = _load_tiny_gguf().write_tiny_gguf(tmp_path / "tiny.gguf", seed=0)
    port = _free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    stderr_path = tmp_path / "server.stderr"
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.backends.llamacpp_server",
             "--model", str(model), "--alias", ALIAS,
             "--host", HOST, "--port", str(port),
             "--ctx-size", "2048", "--parallel", "2", "--threads", "2"],
            cwd=str(REPO_ROOT), env=env,
            stdout=subprocess.PIPE, stderr=err, text=True,
        )
    try:
        _wait_healthy(proc, port, stderr_path)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        proc.stdout.close()


@pytest.mark.integration
def test_llamacpp_server_end_to_end(server):
    proc, port = server
    assert proc.stdout.readline().strip() == f"llama.cpp server listening on http://{HOST}:{port}"

    client = openai.OpenAI(base_url=f"http://{HOST}:{port}/v1", api_key="unused", timeout=30)
    assert [m.id for m in client.models.list().data] == [ALIAS]

    reply = client.chat.completions.create(
        model=ALIAS,
        messages=[{"role": "user", "content": "hello world, how are you?"}],
        max_tokens=12,
    )
    text = reply.choices[0].message.content
    assert isinstance(text, str) and text.strip()
    assert reply.usage.completion_tokens > 0

    stream = client.chat.completions.create(
        model=ALIAS,
        messages=[{"role": "user", "content": "tell me a story"}],
        max_tokens=12,
        stream=True,
    )
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 3
    assert "".join(pieces).strip()

    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as r:
        assert "llamacpp:" in r.read().decode()

    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=5) == 0
    assert time.monotonic() - started < 2.0


def test_missing_model_exits_1(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "agent.backends.llamacpp_server",
         "--model", str(tmp_path / "absent.gguf"), "--alias", ALIAS,
         "--host", HOST, "--port", str(_free_port())],
        cwd=str(REPO_ROOT), env=env, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "model file not found" in result.stderr
