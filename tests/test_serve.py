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
    s = Server(smollm_dir, "--stages", "2", "--max-rows", "8", "--context", "512",
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
    ("/v1/chat/completions", {"model": "smol", "messages": [{"role": "user", "content": " "}]}, 400,
     "every message content is empty"),
    ("/v1/completions", {"model": "smol", "prompt": "hi", "stop": list("abcde")}, 400, "stop: got 5 texts; use up to 4"),
    ("/v1/completions", {"model": "smol", "prompt": "hi", "stop": [""]}, 400, "stop: got ['']"),
    ("/v1/completions", {"prompt": "hi"}, 400, "model: got None"),
    ("/v1/completions", {"model": "smol", "prompt": "word " * 600}, 413, "over the context of 512 tokens"),
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
                _, samples = scrape(s)  # /metrics needs no key, as /health; it counts the restart
                assert value(samples, "distlayer:stage_restarts_total", stage="1") == 1
                assert value(samples, "distlayer:stage_restarts_total", stage="0") == 0
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


# --------------------------------------------------------------------------- /metrics

DASHBOARD = HERE.parent / "examples" / "grafana-dashboard.json"
STAGE_SERIES = ("distlayer:stage_load_seconds_total", "distlayer:stage_stall_seconds_total",
                "distlayer:stage_compute_seconds_total", "distlayer:stage_transfer_seconds_total",
                "distlayer:stage_streamed_bytes_per_step", "distlayer:stage_restarts_total")


def scrape(server: Server, headers=None) -> tuple[str, dict]:
    """``GET /metrics``: its content type, and each sample as ``{(name, labels): value}``
    (labels a sorted tuple of pairs), read with prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    req = urllib.request.Request(server.url + "/metrics", headers=headers or {})
    with urllib.request.urlopen(req, timeout=60) as r:
        kind, text = r.headers["Content-Type"], r.read().decode()
    return kind, {(s.name, tuple(sorted(s.labels.items()))): s.value
                  for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 if none)."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def test_metrics_collector_without_a_server():
    """The registry a server makes, fed a request's events and two stages' stats, without a
    model: its text parses, and says what it was fed."""
    from prometheus_client.parser import text_string_to_metric_families

    from distlayer.metrics import LiveCollector, render, server_registry

    class Model:
        delay = 0.0

        def stats(self):
            time.sleep(self.delay)
            return [{"load_s": 1.5, "stall_s": 0.25, "compute_s": 2.0, "transfer_s": 0.0, "streamed_bytes": 100,
                     "kv_bytes": 7, "restarts": 0, "recovery_s": 0.0},
                    {"load_s": 3.0, "stall_s": 0.5, "compute_s": 4.0, "transfer_s": 0.125, "streamed_bytes": 0,
                     "kv_bytes": 7, "restarts": 2, "recovery_s": 1.25, "h2d_bytes": 4096}]

    class Scheduler:
        def in_flight(self):
            return 5

        def waiting(self):
            return 2

    model = Model()
    registry, requests = server_registry(model, Scheduler(), "m")
    t0 = time.monotonic()
    timer = requests.track(11, t0 - 1.0)  # arrived a second ago
    for token in (4, 5, 6):
        timer("token", token)
    timer("end", "length")
    requests.track(3, t0)("error", RuntimeError("lost"))  # failed before its first token: no prompt tokens counted

    def samples():
        body, kind = render(registry)
        assert kind.startswith("text/plain")
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(body.decode()) for s in f.samples}

    got = samples()
    assert value(got, "distlayer:prompt_tokens_total") == 11
    assert value(got, "distlayer:generation_tokens_total") == 3
    assert value(got, "distlayer:request_success_total", finished_reason="length") == 1
    assert value(got, "distlayer:request_success_total", finished_reason="error") == 1
    assert value(got, "distlayer:request_success_total", finished_reason="stop") == 0
    assert value(got, "distlayer:time_to_first_token_seconds_count") == 1
    assert value(got, "distlayer:time_to_first_token_seconds_sum") >= 1.0
    assert value(got, "distlayer:time_per_output_token_seconds_count") == 1
    assert value(got, "distlayer:e2e_request_latency_seconds_count") == 1
    assert value(got, "distlayer:num_requests_running", model_name="m") == 3
    assert value(got, "distlayer:num_requests_waiting", model_name="m") == 2
    assert value(got, "distlayer:stages_up") == 1
    assert value(got, "distlayer:stage_load_seconds_total", stage="1", model_name="m") == 3.0
    assert value(got, "distlayer:stage_transfer_seconds_total", stage="1") == 0.125
    assert value(got, "distlayer:stage_restarts_total", stage="1") == 2
    assert value(got, "distlayer:stage_recovery_seconds_total", stage="1") == 1.25
    assert value(got, "distlayer:stage_streamed_bytes_per_step", stage="0") == 100
    assert ("distlayer:stage_h2d_bytes_total", (("model_name", "m"), ("stage", "1"))) in got
    assert ("distlayer:stage_h2d_bytes_total", (("model_name", "m"), ("stage", "0"))) not in got  # not a GPU stage
    # a second server's registry is its own: nothing of the first shows in it
    other, _ = server_registry(model, Scheduler(), "m2")
    assert b'model_name="m"' not in render(other)[0]
    # stages that do not answer in time leave their series out, and stages_up at 0
    model.delay = 0.5
    slow = {s.name: s.value for f in LiveCollector(model, "m", timeout=0.05).collect() for s in f.samples}
    assert slow == {"distlayer:stages_up": 0}


def test_stage_series_exported_through_ray_metrics(monkeypatch):
    """export_stage_metrics sets one ray.util.metrics gauge per stage figure, tagged with
    the stage, under names Ray accepts; an in-process pipeline exports nothing."""
    import re

    import ray.util.metrics

    from distlayer import metrics

    made: dict[str, list] = {}

    class Gauge:
        def __init__(self, name, description="", tag_keys=()):
            assert re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", name), name  # Ray takes no colon
            self.name, self.tag_keys = name, tag_keys
            made[name] = []

        def set(self, v, tags=None):
            assert set(tags) == set(self.tag_keys)
            made[self.name].append((tags["stage"], v))

    class Model:
        class pipeline:
            remote = True

        def stats(self):
            return [{"load_s": 1.0, "restarts": 0}, {"load_s": 2.0, "restarts": 1}]

    monkeypatch.setattr(ray.util.metrics, "Gauge", Gauge)
    monkeypatch.setattr(metrics, "_ray_gauges", {})
    assert metrics.export_stage_metrics(Model(), "m")
    assert made["distlayer_stage_load_seconds"] == [("0", 1.0), ("1", 2.0)]
    assert made["distlayer_stage_restarts"] == [("0", 0.0), ("1", 1.0)]
    Model.pipeline.remote = False
    made.clear()
    assert not metrics.export_stage_metrics(Model(), "m") and not made


@pytest.mark.slow
def test_metrics_count_what_was_sent(server):
    """After a few requests, /metrics' counters grew by what the responses' usage says, and
    every stage has its series."""
    idle(server)
    kind, before = scrape(server)
    assert kind.startswith("text/plain; version="), kind  # Prometheus' text format
    c = server.client()
    usages, reasons = [], []
    chat = c.chat.completions.create(model="smol", messages=FRANCE, temperature=0, max_tokens=30)
    usages.append(chat.usage)
    reasons.append(chat.choices[0].finish_reason)
    for n in (3, 7):
        done = c.completions.create(model="smol", prompt="The capital of France is", temperature=0, max_tokens=n)
        usages.append(done.usage)
        reasons.append(done.choices[0].finish_reason)
    streamed = list(c.completions.create(model="smol", prompt="Count: 1, 2,", temperature=0, max_tokens=6,
                                         stream=True, stream_options={"include_usage": True}))
    usages.append(streamed[-1].usage)
    reasons.append(next(ch.choices[0].finish_reason for ch in streamed if ch.choices and ch.choices[0].finish_reason))
    idle(server)
    _, after = scrape(server)

    def grew(name, **labels):
        return value(after, name, model_name="smol", **labels) - value(before, name, model_name="smol", **labels)

    assert grew("distlayer:prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert grew("distlayer:generation_tokens_total") == sum(u.completion_tokens for u in usages)
    for reason in ("stop", "length"):
        assert grew("distlayer:request_success_total", finished_reason=reason) == reasons.count(reason), reasons
    assert grew("distlayer:time_to_first_token_seconds_count") == len(usages)
    assert grew("distlayer:e2e_request_latency_seconds_count") == len(usages)
    assert grew("distlayer:time_per_output_token_seconds_count") == sum(u.completion_tokens > 1 for u in usages)
    assert grew("distlayer:e2e_request_latency_seconds_sum") > 0
    assert value(after, "distlayer:num_requests_running") == 0 and value(after, "distlayer:num_requests_waiting") == 0
    assert value(after, "distlayer:stages_up") == 1
    for name in STAGE_SERIES:  # the stages as they are now: both of them
        assert {dict(ls)["stage"] for n, ls in after if n == name} == {"0", "1"}, name
    assert grew("distlayer:stage_compute_seconds_total", stage="0") > 0
    assert grew("distlayer:stage_compute_seconds_total", stage="1") > 0


@pytest.mark.slow
def test_grafana_dashboard_names_only_exported_series(server):
    """examples/grafana-dashboard.json is JSON Grafana imports, and every series its queries
    name is one /metrics exports (read from a real scrape); it shows each series the
    server is for."""
    import re

    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] and dash["panels"] and dash["__inputs"][0]["pluginId"] == "prometheus"
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert exprs and all(re.search(r"distlayer:\w+", e) for e in exprs), exprs
    named = set(re.findall(r"distlayer:[A-Za-z0-9_:]+", DASHBOARD.read_text()))  # templating too
    server.client().completions.create(model="smol", prompt="Hi", max_tokens=2, temperature=0)  # every series sampled
    _, samples = scrape(server)
    exported = {n for n, _ in samples}
    assert named <= exported, sorted(named - exported)
    families = {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in named}
    for needed in ("request_success", "prompt_tokens", "generation_tokens", "time_to_first_token_seconds",
                   "time_per_output_token_seconds", "e2e_request_latency_seconds", "num_requests_running",
                   "num_requests_waiting", *(s.split(":")[1].removesuffix("_total") for s in STAGE_SERIES)):
        assert "distlayer:" + needed in families, needed
