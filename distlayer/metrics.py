"""Metrics: Prometheus series for ``distlayer serve`` (``GET /metrics``), and the per-stage
series for Ray's own metrics, for batch jobs and anything else that runs a pipeline.

The request series are named like vLLM's (``vllm:`` becomes ``distlayer:``), so a vLLM
dashboard needs little more than its prefix changed; every series has a ``model_name``
label, as vLLM's do. The stage series carry a ``stage`` label and are read from
``model.stats()`` when scraped, so a scrape shows the stages as they are now. Each
server has a registry of its own (not ``prometheus_client``'s global one), so two servers
in one process do not clash.

``prometheus_client`` comes with ``ray[default]``; Ray itself is imported only inside
:func:`export_to_ray`.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, TimeoutError as FutureTimeout

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "distlayer:"
STATS_TIMEOUT = 5.0  # seconds a scrape waits for the stages' stats (within Prometheus' default 10 s scrape timeout)

# vLLM's buckets, extended at the top: a model streamed from disk can take minutes a token.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0)

# Each stage's figures: (key in model.stats(), series name less the prefix, kind, help).
# Counters are the stage process's running totals: a replaced stage starts again from 0,
# which Prometheus' rate() reads as a counter reset. restarts and recovery_s are the driver's.
STAGE_SERIES = (
    ("load_s", "stage_load_seconds", "counter",
     "Seconds the stage spent loading weights (disk reads, and host-to-device copies on a GPU)."),
    ("stall_s", "stage_stall_seconds", "counter", "Seconds the stage's forwards waited for streamed weights."),
    ("compute_s", "stage_compute_seconds", "counter",
     "Seconds the stage spent computing (forwards less their waits for weights)."),
    ("transfer_s", "stage_transfer_seconds", "counter",
     "Seconds hidden states spent being handed to the stage (sent until received)."),
    ("h2d_bytes", "stage_h2d_bytes", "counter",
     "Bytes of weights the stage copied from host to device (GPU stages only)."),
    ("restarts", "stage_restarts", "counter", "Times the stage was lost and replaced."),
    ("recovery_s", "stage_recovery_seconds", "counter", "Seconds spent replacing the stage after losses."),
    ("streamed_bytes", "stage_streamed_bytes_per_step", "gauge",
     "Bytes of weights the stage streams from disk each step (at batch 1, as planned)."),
    ("resident_bytes", "stage_resident_bytes", "gauge", "Bytes of weights the stage keeps in memory."),
    ("kv_bytes", "stage_kv_bytes", "gauge", "Bytes the stage's KV caches hold now."),
    ("peak_weight_bytes", "stage_peak_weight_bytes", "gauge", "Most bytes of weights the stage held at once."),
    ("peak_rss_bytes", "stage_peak_rss_bytes", "gauge", "Peak resident memory of the stage's process."),
)


def stage_families(stats: list[dict], model_name: str) -> list:
    """The per-stage metric families of ``stats`` (``model.stats()``: one dict per stage);
    a figure a stage does not report (``h2d_bytes`` off a GPU) is left out for it."""
    out = []
    for key, name, kind, doc in STAGE_SERIES:
        family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
            PREFIX + name, doc, labels=["model_name", "stage"])
        for i, s in enumerate(stats):
            if s.get(key) is not None:
                family.add_metric([model_name, str(i)], float(s[key]))
        if family.samples:
            out.append(family)
    return out


class LiveCollector:
    """What a scrape reads now: rows running and waiting (``scheduler``, if given) and each
    stage's stats (``model.stats()``).

    A scrape waits at most ``timeout`` seconds for the stats; a stage busy for longer (or
    gone) leaves the stage series out of that scrape and ``distlayer:stages_up`` at 0. One
    fetch at a time: a scrape that comes while one is still out waits on that one.
    """

    def __init__(self, model, model_name: str, scheduler=None, timeout: float = STATS_TIMEOUT):
        self.model, self.model_name, self.scheduler, self.timeout = model, model_name, scheduler, timeout
        self._lock = threading.Lock()
        self._pending: Future | None = None

    def stats(self) -> list[dict] | None:
        """Every stage's stats, or None if they did not all answer within the timeout."""
        with self._lock:
            if self._pending is None:
                self._pending = fut = Future()
                threading.Thread(target=self._fetch, args=(fut,), name="distlayer-metrics", daemon=True).start()
            fut = self._pending
        try:
            return fut.result(timeout=self.timeout)
        except FutureTimeout:
            return None  # still out: the next scrape waits on the same fetch
        except Exception:
            return None

    def _fetch(self, fut: Future) -> None:
        try:
            fut.set_result(self.model.stats())
        except BaseException as e:  # a stage lost, or the model closed
            fut.set_exception(e)
        finally:
            with self._lock:
                if self._pending is fut:
                    self._pending = None

    def collect(self):
        label = [self.model_name]
        if self.scheduler is not None:
            in_flight, waiting = self.scheduler.in_flight(), self.scheduler.waiting()
            for name, value, doc in (
                    ("num_requests_running", in_flight - waiting, "Requests admitted to a running batch."),
                    ("num_requests_waiting", waiting, "Requests queued, waiting for room in a batch.")):
                g = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
                g.add_metric(label, max(0, value))
                yield g
        stats = self.stats()
        up = GaugeMetricFamily(PREFIX + "stages_up", "1 if every stage answered this scrape's stats in time, else 0.",
                               labels=["model_name"])
        up.add_metric(label, 0 if stats is None else 1)
        yield up
        yield from stage_families(stats or [], self.model_name)


class RequestMetrics:
    """The request series of one server, in ``registry``: requests by finish reason,
    prompt and generated tokens, time to first token, time per output token and
    end-to-end latency. :meth:`track` gives each request its listener."""

    def __init__(self, registry: CollectorRegistry, model_name: str):
        self.model_name = model_name
        kw = dict(labelnames=["model_name"], registry=registry)
        self.success = Counter(PREFIX + "request_success", "Requests finished, by finish reason (stop, length, "
                               "cancelled: the client went away, error: the pipeline failed).",
                               labelnames=["model_name", "finished_reason"], registry=registry)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens prefilled.", **kw).labels(model_name)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.", **kw).labels(model_name)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Seconds from a request's arrival to its "
                              "first generated token.", buckets=TTFT_BUCKETS, **kw).labels(model_name)
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds", "A finished request's mean seconds per "
                              "output token after the first.", buckets=TPOT_BUCKETS, **kw).labels(model_name)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Seconds from a request's arrival until it "
                             "finished (stop or length).", buckets=E2E_BUCKETS, **kw).labels(model_name)
        for reason in ("stop", "length", "cancelled", "error"):  # every reason shown from the start, at 0
            self.success.labels(model_name, reason)

    def track(self, prompt_tokens: int, arrived: float) -> "RequestTimer":
        """A listener for one request's scheduler events (see ``Scheduler.submit``);
        ``arrived``: its ``time.monotonic()`` on arrival."""
        return RequestTimer(self, prompt_tokens, arrived)


class RequestTimer:
    """One request's timings, fed its scheduler events (on the scheduler's thread)."""

    def __init__(self, metrics: RequestMetrics, prompt_tokens: int, arrived: float):
        self.metrics, self.prompt_tokens, self.arrived = metrics, prompt_tokens, arrived
        self.first = self.last = None
        self.tokens = 0

    def __call__(self, kind: str, value) -> None:
        now, m = time.monotonic(), self.metrics
        if kind == "token":
            self.tokens += 1
            m.generation_tokens.inc()
            if self.first is None:  # the prompt was prefilled
                self.first = now
                m.prompt_tokens.inc(self.prompt_tokens)
                m.ttft.observe(now - self.arrived)
            self.last = now
            return
        reason = value if kind == "end" and value else "error"
        m.success.labels(m.model_name, reason).inc()
        if reason in ("stop", "length"):
            m.e2e.observe(now - self.arrived)
            if self.tokens > 1:
                m.tpot.observe((self.last - self.first) / (self.tokens - 1))


def server_registry(model, scheduler, model_name: str) -> tuple[CollectorRegistry, RequestMetrics]:
    """A registry of a server's own with every series ``GET /metrics`` shows, and the
    request series to feed."""
    registry = CollectorRegistry()
    requests = RequestMetrics(registry, model_name)
    registry.register(LiveCollector(model, model_name, scheduler))
    return registry, requests


# --------------------------------------------------------------------------- Ray's metrics

_ray_gauges: dict = {}  # series name -> ray.util.metrics.Gauge, made once per process


def export_to_ray(stats: list[dict], model_name: str) -> None:
    """Set each stage's figures (``model.stats()``) as ``ray.util.metrics`` gauges, tagged
    ``model_name`` and ``stage``. Ray's Prometheus endpoint on this node (its
    ``metrics_export_port``) then shows them as ``ray_distlayer_stage_*`` (Ray's names take
    no colon; counters here are gauges of the running totals). Ray must be initialised."""
    from ray.util.metrics import Gauge

    for key, name, _kind, doc in STAGE_SERIES:
        series = "distlayer_" + name
        if series not in _ray_gauges:
            _ray_gauges[series] = Gauge(series, description=doc, tag_keys=("model_name", "stage"))
        for i, s in enumerate(stats):
            if s.get(key) is not None:
                _ray_gauges[series].set(float(s[key]), tags={"model_name": model_name, "stage": str(i)})


def export_stage_metrics(model, model_name: str) -> bool:
    """:func:`export_to_ray` of ``model``'s stats now; does nothing for a pipeline without
    Ray (in-process stages). Returns whether it exported."""
    if not model.pipeline.remote:
        return False
    export_to_ray(model.stats(), model_name)
    return True


class RayExport:
    """Calls :func:`export_stage_metrics` at most every ``interval`` seconds: call
    :meth:`tick` as work finishes, and :meth:`now` at the end."""

    def __init__(self, model, model_name: str, interval: float = 10.0):
        self.model, self.model_name, self.interval = model, model_name, interval
        self.last = time.monotonic()

    def tick(self) -> None:
        if time.monotonic() - self.last >= self.interval:
            self.now()

    def now(self) -> None:
        self.last = time.monotonic()
        try:
            export_stage_metrics(self.model, self.model_name)
        except Exception:  # best effort: a stage that does not answer fails the work itself, not here
            pass


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """A scrape of ``registry``: the body in Prometheus' text format, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(registry), CONTENT_TYPE_LATEST
