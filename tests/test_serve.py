"""`gqsa-gguf serve`: llama-cpp-python's OpenAI-compatible server on the patched llama.cpp, driven
with the `openai` client.

The model is tests/hostile.py's tiny GQSA base (2 layers, width 64, gqsa4 linears, its own 292-token
vocabulary) with a chat template added to its metadata, so that the template the server uses can be
told from llama-cpp-python's fallback. The server runs in a child process (`python -m gqsa_gguf.cli
serve`) on 127.0.0.1 with --port 0 (a free port, read from its start-up line) and is stopped at the
end of the module. Needs the native build and the `serve`/`test` extras (scripts/setup.sh); without
them these tests fail, they do not skip.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import jinja2
import openai
import pytest

import hostile
from gqsa_gguf.cli import main

REPO = Path(__file__).resolve().parents[1]
ALIAS = "tiny-gqsa"
# A template no built-in format of llama-cpp-python resembles: a prompt formatted any other way
# has another length.
TEMPLATE = ("### gqsa-gguf test template ###\n{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n"
            "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
START_TIMEOUT = 60.0
# The tiny model's weights are random: bias its greedy choice to one whole-word token (' the'), so
# that every generated token is a printable piece of its own (no end-of-text, no byte tokens).
TOKENS = hostile.tiny_vocab()[0]
THE = TOKENS.index("\u2581the")
BIAS = {str(THE): 100}
BOS = 1
HOSTILE_CASE = "gqsa_index_out_of_range"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    base = hostile.write_base(d / "base.gguf")
    model = hostile.Model.of(hostile.layout(base))
    model.set_kv("tokenizer.chat_template", hostile.kv_string(TEMPLATE))
    (d / "chat.gguf").write_bytes(model.to_bytes())
    case = next(c for c in hostile.CASES if c.name == HOSTILE_CASE)
    bad = hostile.write_cases(d, [case])[HOSTILE_CASE]
    return {"chat": d / "chat.gguf", "hostile": bad, "case": case}


def _serve_cmd(gguf, *extra) -> list[str]:
    return [sys.executable, "-m", "gqsa_gguf.cli", "serve", str(gguf), "--host", "127.0.0.1", *extra]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CONFIG_FILE"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(base: str, path: str, body: bytes | None = None, timeout: float = 30) -> tuple[int, dict]:
    """(status, JSON body) of a GET (body None) or POST to the server, proxies bypassed."""
    req = urllib.request.Request(base + path, data=body, headers={"Content-Type": "application/json"})
    try:
        with _NO_PROXY.open(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(files, tmp_path_factory):
    """The base URL (http://127.0.0.1:PORT) of a running `gqsa-gguf serve` on the tiny model."""
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(_serve_cmd(files["chat"], "--port", "0", "--n-ctx", "256", "--threads", "1",
                                           "--model-alias", ALIAS),
                                cwd=REPO, env=_env(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        base, deadline = None, time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"serve exited with {proc.returncode} at start:\n{log.read_text(errors='replace')}")
            if base is None:
                m = re.search(r"at (http://127\.0\.0\.1:\d+)/v1 ", log.read_text(errors="replace"))
                base = m.group(1) if m else None
            if base is not None:
                try:
                    if http(base, "/v1/models", timeout=5)[0] == 200:
                        break
                except (urllib.error.URLError, ConnectionError, socket.timeout):
                    pass
            time.sleep(0.2)
        else:
            pytest.fail(f"serve did not answer within {START_TIMEOUT:.0f} s:\n{log.read_text(errors='replace')}")
        yield base
    finally:
        proc.terminate()            # uvicorn shuts down gracefully on SIGTERM
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@pytest.fixture(scope="module")
def client(server):
    http_client = openai.DefaultHttpx2Client(trust_env=False, timeout=30)     # no proxy for 127.0.0.1
    c = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=30, http_client=http_client)
    yield c
    c.close()


MESSAGES = [{"role": "user", "content": "the cat"}]


def test_models_lists_the_alias(server):
    status, body = http(server, "/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == [ALIAS]


def test_chat_completion_uses_the_files_chat_template(server, client):
    r = client.chat.completions.create(model=ALIAS, messages=MESSAGES, max_tokens=6, temperature=0,
                                       logit_bias=BIAS)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content.split() == ["the"] * 6, choice.message.content
    assert choice.finish_reason == "length" and r.usage.completion_tokens == 6
    # the prompt is the file's template rendered (no BOS: the template handler adds none)
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)      # as llama-cpp-python's formatter
    prompt = env.from_string(TEMPLATE).render(messages=MESSAGES, add_generation_prompt=True)
    status, tok = http(server, "/extras/tokenize", json.dumps({"input": prompt}).encode())
    assert status == 200
    ids = tok["tokens"][1:] if tok["tokens"][:1] == [BOS] else tok["tokens"]
    assert r.usage.prompt_tokens == len(ids), (r.usage, prompt)


def test_streamed_chat_arrives_token_by_token(client):
    kw = dict(model=ALIAS, messages=MESSAGES, max_tokens=5, temperature=0, logit_bias=BIAS)
    pieces, finish = [], None
    stream = client.chat.completions.create(stream=True, **kw)
    try:
        for chunk in stream:
            delta = chunk.choices[0].delta
            if delta.content:
                pieces.append(delta.content)
            finish = chunk.choices[0].finish_reason or finish
    finally:
        stream.close()
    assert len(pieces) == 5, pieces            # one chunk per generated token
    assert finish == "length"
    whole = client.chat.completions.create(**kw).choices[0].message.content
    assert "".join(pieces).strip() == whole.strip()


@pytest.mark.parametrize("body, param, needle", [
    ({"model": ALIAS}, "messages", "'messages' is required"),
    ({"model": ALIAS, "messages": []}, "messages", "must not be empty"),
    ({"model": ALIAS, "messages": "the cat"}, "messages", "messages: Input should be a valid list"),
    ({"model": ALIAS, "messages": MESSAGES, "max_tokens": "many"}, "max_tokens", "max_tokens: Input should be a valid integer"),
    (b'{"model": "tiny-gqsa", "messages": [', None, "not valid JSON"),
])
def test_malformed_request_is_a_400_and_the_server_keeps_serving(server, body, param, needle):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, answer = http(server, "/v1/chat/completions", raw)
    assert status == 400, answer
    err = answer["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and needle in err["message"], err
    status, ok = http(server, "/v1/chat/completions",
                      json.dumps({"model": ALIAS, "messages": MESSAGES, "max_tokens": 2}).encode())
    assert status == 200 and ok["usage"]["completion_tokens"] == 2, ok


def test_malformed_request_through_the_openai_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=ALIAS, messages="the cat", max_tokens=2)
    assert e.value.status_code == 400 and "messages" in str(e.value)
    r = client.chat.completions.create(model=ALIAS, messages=MESSAGES, max_tokens=2)
    assert r.usage.completion_tokens == 2


def test_hostile_file_is_refused_before_listening(files):
    case = files["case"]
    # --port 0 cannot collide with anything; the refusal must come before a socket listens
    proc = subprocess.run(_serve_cmd(files["hostile"], "--port", "0"), cwd=REPO, env=_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.startswith(f"gqsa-gguf serve: error: cannot load {files['hostile']}"), proc.stderr
    assert re.search(case.llama, proc.stderr), proc.stderr        # llama.cpp's loader's own reason
    assert "serving" not in proc.stderr and "Uvicorn running" not in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


def test_argument_and_start_errors(files, capsys, tmp_path):
    assert main(["serve", str(tmp_path / "missing.gguf")]) == 1
    assert "gqsa-gguf serve: error: GGUF file" in capsys.readouterr().err
    assert main(["serve", str(files["chat"]), "--port", "70000"]) == 2
    assert "--port 70000 must be in 0..65535" in capsys.readouterr().err
    assert main(["serve", str(files["chat"]), "--n-ctx", "0"]) == 2
    # a port in use is refused before the model is loaded
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["serve", str(files["chat"]), "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "choose another --port" in err, err
