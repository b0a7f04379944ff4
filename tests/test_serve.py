"""``distlayer serve``: a real server process over a real pipeline, spoken to with the real
``openai`` client (and raw HTTP for what a client library hides)."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

HERE = Path(__file__).parent
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


class Server:
    """``distlayer serve`` in its own process; stopped with SIGTERM (which must end it cleanly)."""

    def __init__(self, model, *args, env=None):
        cmd = [sys.executable, "-m", "distlayer", "serve", str(model), "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE,
                                     env={**os.environ, **(env or {})})
        self.err: list[str] = []
        threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True).start()
        deadline = time.monotonic() + 300
        while not any("serving" in line for line in self.err):
            assert self.proc.poll() is None, "".join(self.err)[-3000:]
            assert time.monotonic() < deadline, "".join(self.err)[-3000:]
            time.sleep(0.2)
        line = next(line for line in self.err if "serving" in line)
        self.url = line.split(" on ")[1].split("/v1")[0]                # the port the system picked

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def http(self, path: str, body=None, headers=None, method=None) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method or ("POST" if data else "GET"),
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        finally:
            self.proc.kill()
        log = "".join(self.err)
        assert self.proc.returncode == 0, log[-3000:]
        assert "Traceback" not in log, log[-3000:]


@pytest.fixture(scope="module")
def server(smollm_dir):
    s = Server(smollm_dir, "--stages", "2", "--batch-size", "8", "--context", "512",
               "--served-model-name", "smol")
    yield s
    s.stop()                                                      # SIGTERM: clean exit, no traceback


def idle(server: Server, timeout: float = 30) -> dict:
    """Wait until nothing is in flight; returns /health."""
    deadline = time.monotonic() + timeout
    while True:
        status, health = server.http("/health")
        assert status == 200, health
        if health["in_flight"] == 0 and all(s["kv_bytes"] == 0 for s in health["stages"]):
            return health
        assert time.monotonic() < deadline, health
        time.sleep(0.2)


@pytest.mark.slow
def test_chat_and_completion_streamed_and_whole(server, smollm_dir):
    from distlayer import AutoModel

    c = server.client()
    assert [m.id for m in c.models.list().data] == ["smol"]
    whole = c.chat.completions.create(model="smol", messages=FRANCE, temperature=0, max_tokens=30)
    assert "Paris" in whole.choices[0].message.content and whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens > 0 and whole.usage.total_tokens == \
        whole.usage.prompt_tokens + whole.usage.completion_tokens
    chunks = list(c.chat.completions.create(model="smol", messages=FRANCE, temperature=0, max_tokens=30,
                                            stream=True))
    pieces = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert len(pieces) > 3 and "".join(pieces) == whole.choices[0].message.content  # one chunk per token
    assert chunks[-1].choices[0].finish_reason == "stop"
    # a greedy answer equals generate() for the same prompt alone
    with AutoModel.from_pretrained(smollm_dir, stages=0, progress=False) as m:
        tok = m.tokenizer
        text = tok.apply_chat_template(FRANCE, add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        want = tok.decode(m.generate(ids, max_new_tokens=30)[0, ids.shape[1]:], skip_special_tokens=True)
    assert whole.choices[0].message.content == want
    done = c.completions.create(model="smol", prompt="The capital of France is", temperature=0, max_tokens=5)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="smol", prompt="The capital of France is", temperature=0, max_tokens=5, stream=True))
    assert done.choices[0].text == streamed and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 5
    stopped = c.completions.create(model="smol", prompt="The capital of France is", temperature=0, max_tokens=20,
                                   stop=[" Paris"])
    assert "Paris" not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"
    seeded = [c.completions.create(model="smol", prompt="Once upon a time", temperature=0.9, seed=7,
                                   max_tokens=12).choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1]
    idle(server)


@pytest.mark.slow
def test_eight_concurrent_streams_short_ones_finish_first(server):
    c = server.client()
    lengths = [4, 40, 8, 36, 12, 32, 16, 28]
    finished: dict[int, float] = {}

    def run(n: int) -> tuple[str, int]:
        stream = c.completions.create(model="smol", prompt=f"List {n} fruits:", temperature=0, max_tokens=n,
                                      stream=True, stream_options={"include_usage": True})
        text, usage = "", None
        for ch in stream:
            if ch.choices:
                text += ch.choices[0].text
            if ch.usage:
                usage = ch.usage.completion_tokens
        finished[n] = time.monotonic()
        return text, usage

    with cf.ThreadPoolExecutor(8) as ex:
        results = dict(zip(lengths, ex.map(run, lengths)))
    for n, (text, used) in results.items():
        assert text and 0 < used <= n
        alone = c.completions.create(model="smol", prompt=f"List {n} fruits:", temperature=0, max_tokens=n)
        assert alone.choices[0].text == text                     # the same answer as alone
    order = sorted(finished, key=finished.get)
    assert order.index(4) < order.index(40) and order.index(8) < order.index(36)
    idle(server)                                                  # every stage's KV cache freed


@pytest.mark.slow
def test_a_client_that_goes_away_frees_its_request(server):
    body = {"model": "smol", "prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 400, "stream": True,
            "temperature": 0}
    req = urllib.request.Request(server.url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        for _ in range(5):
            assert r.readline().startswith((b"data:", b"\n"))
        status, health = server.http("/health")
        assert health["in_flight"] == 1 and any(s["kv_bytes"] for s in health["stages"])
    # the connection is closed halfway: the request is cancelled and its KV cache freed
    idle(server)
    again = server.client().completions.create(model="smol", prompt="Hello", max_tokens=3, temperature=0)
    assert again.usage.completion_tokens == 3                     # and the server keeps serving


@pytest.mark.slow
@pytest.mark.parametrize("path, body, status, words", [
    ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/chat/completions", {"model": "gpt-9", "messages": FRANCE}, 404, "'gpt-9' does not exist"),
    ("/v1/completions", {"model": "smol", "prompt": "hi", "max_tokens": -5}, 400, "max_tokens: got -5"),
    ("/v1/completions", {"model": "smol", "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens: got 'ten'"),
    ("/v1/completions", {"model": "smol", "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": "smol", "prompt": "hi", "n": 2}, 400, "n=1"),
    ("/v1/completions", {"model": "smol", "prompt": 42}, 400, "prompt: got 42"),
    ("/v1/completions", {"model": "smol", "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {"model": "smol", "messages": "hello"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "smol"}, 400, "messages"),
    ("/v1/completions", {"prompt": "hi"}, 400, "model: got None"),
    ("/v1/completions", {"model": "smol", "prompt": "word " * 600}, 413, "over this model's context of 512"),
    ("/v1/nothing", {"model": "smol"}, 404, "no such path"),
])
def test_bad_requests_get_openai_errors(server, path, body, status, words):
    got, data = server.http(path, body)
    assert got == status and words in data["error"]["message"], data
    assert set(data["error"]) >= {"message", "type", "param", "code"}
    assert server.http("/health")[0] == 200                       # the server lives on


def test_api_key_and_a_lost_stage(tiny_dir):
    """A key is required when set; a stage that dies is replaced and the request answered
    as before; past --max-restarts, a 503 names the stage."""
    import psutil

    s = Server(tiny_dir("llama"), "--stages", "2", "--max-restarts", "1", "--served-model-name", "tiny",
               env={"DISTLAYER_API_KEY": "k1"})
    key = {"Authorization": "Bearer k1"}
    try:
        body = {"model": "tiny", "prompt": "w010 w011", "max_tokens": 8, "temperature": 0}
        status, data = s.http("/v1/completions", body)
        assert status == 401 and "API key" in data["error"]["message"]
        assert s.http("/v1/completions", body, {"Authorization": "Bearer wrong"})[0] == 401
        ok = s.client(api_key="k1").completions.create(model="tiny", prompt="w010 w011", max_tokens=8,
                                                      temperature=0)
        assert ok.usage.completion_tokens >= 1
        for restart in (1, 2):
            pid = s.http("/health")[1]["stages"][1]["pid"]
            psutil.Process(pid).kill()
            status, data = s.http("/v1/completions", body, key)
            if restart == 1:  # replaced: the same answer, a new process
                assert status == 200 and data["choices"][0]["text"] == ok.choices[0].text, data
                health = s.http("/health")[1]["stages"][1]
                assert health["pid"] != pid and health["restarts"] == 1, health
            else:             # one restart allowed in ten minutes: the next loss is an error
                assert status == 503 and "stage 1" in data["error"]["message"], data
                assert "max_restarts=1" in data["error"]["message"], data
        assert s.http("/health")[0] == 503
    finally:
        s.stop()


def test_a_taken_port_is_named_before_the_model_loads(tiny_dir):
    """The port is bound first: a taken one is one sentence, at once, and nothing is started."""
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "distlayer", "serve", str(tiny_dir("llama")), "--port", str(port)],
                           capture_output=True, text=True, cwd=HERE, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr and "--port" in r.stderr, r.stderr
    assert "serving" not in r.stderr
