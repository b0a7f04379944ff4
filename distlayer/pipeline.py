"""The driver: measures where the stages run, plans them (``planner.plan_pipeline``),
starts one StageActor per stage, and hands work to a transport.

With Ray, each stage is an actor on its own device (a GPU or ``gpus_per_stage`` of
one, or a share of a node's CPUs), placed with a placement group; hidden states go from actor to actor, never
through the driver (``transport.sockets.SocketTransport``: Unix sockets when the driver and
every stage share a node, else TCP; ``transport.refs.RefTransport`` over object refs with
``transport="ray"``; the ``transport`` package's registry picks), and several micro-batches are
in flight so every stage works at once. ``in_process=True`` (or ``stages=0``) runs the
same StageActor objects in this process, one after another, without Ray. This is the
only module that imports ``ray``. Before the stages load, ``fill.fill_stages`` makes
sure each node has its stages' units on its own disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import torch

from . import arch, devices, hardware, versions
from .config import PipelineConfig, leave_out, parse_address, spell
from .cost import Prediction, predict
from .errors import ConfigError, StageError, StageLost
from .fill import fill_stages
from .liveness import HEALTH, Heartbeat
from .placement import PlacedPlan, PlacedStage, Placement
from .planner import Layout, ModelShape, Site, check_stages, micro_batch_choices, pipeline_layout, plan_pipeline
from .recovery import Recovering, Restarts
from .stage import StageActor
from .store import LayerStore, open_configured
from .survey import Survey, balance_for, survey, timer_for
from .transport import Transport, delivers_waves, make

# libgomp's spin before an idle OpenMP thread sleeps. CPU stages on one node take
# turns on its cores, so a stage that just finished must not spin on the cores the
# next stage needs, yet a thread between two ops of a forward should not sleep
# (measurements: benchmarks/README.md).
GOMP_SPINCOUNT = "50000"
CLOSE_TIMEOUT = 10  # seconds closing waits for Ray to release a placement group


def stage_env(device: str, all_cores: bool, environ=None) -> dict[str, str]:
    """OpenMP settings for a CPU stage's process, unless the user set their own.

    - ``GOMP_SPINCOUNT``: idle threads spin only briefly (see ``GOMP_SPINCOUNT`` above).
    - With ``all_cores`` (the stage computes on every core of its node, taking turns with
      the node's other stages), its OpenMP threads are bound one per core, in the same
      order in every stage. Stages that compute at once on one node (fewer threads each)
      are left unbound.
    """
    environ = os.environ if environ is None else environ
    if not devices.kind_of(device).sets_threads:
        return {}
    env = {}
    if not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(environ):
        env["GOMP_SPINCOUNT"] = GOMP_SPINCOUNT
    if all_cores and not {"OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY"} & set(environ):
        env.update(OMP_PROC_BIND="close", OMP_PLACES="cores")
    return env


# --------------------------------------------------------------------------- the stages


class LocalStages:
    """Stage objects in this process (the ``Stages`` a transport drives)."""

    remote = False

    def __init__(self, actors: list[StageActor]):
        self.actors = actors

    def call(self, actor, method: str, *args):
        return getattr(actor, method)(*args)

    def call_with(self, actor, fn, *args):
        return fn(actor, *args)

    def get(self, refs, timeout=None):
        return refs

    def describe(self) -> list[dict]:
        """What each stage reports of where it runs."""
        return [{**a.describe(), "node_id": "local"} for a in self.actors]

    def close(self) -> None:
        for a in self.actors:
            a.close()
        self.actors = []


def ray_address_file() -> Path:
    """Where ``ray start`` records the cluster it started on this machine: the file Ray's
    own ``address="auto"`` reads, under Ray's temp dir (``RAY_TMPDIR``, else ``TMPDIR``,
    else /tmp)."""
    try:
        from ray._common.utils import get_ray_address_file

        return Path(get_ray_address_file(None))
    except (ImportError, AttributeError, TypeError):  # another Ray: its documented order
        base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
        return Path(base) / "ray" / "ray_current_cluster"


def probe_address(address: str, timeout: float, prefix: str = "") -> None:
    """Fail within ``timeout`` seconds, with what to do, when nothing answers at the Ray
    cluster ``address`` (``"auto"``: ``RAY_ADDRESS``, else the cluster ``ray start`` last
    recorded on this machine), instead of letting Ray retry forever. ``prefix`` names the
    settings in messages as :func:`config.build`'s does (``"--"``: the CLI's flags)."""
    local = f"{leave_out(prefix, 'address')} for a private local Ray"
    if address == "auto":
        recorded = ray_address_file()
        address = os.environ.get("RAY_ADDRESS") or (recorded.read_text().strip() if recorded.is_file() else "")
        if not address:
            raise ConfigError(f"{spell(prefix, 'address', 'auto')} but no `ray start` cluster is recorded on this "
                              f"machine (no RAY_ADDRESS, no {recorded}): start one with `ray start --head`, or {local}")
    host, port = parse_address(address) or (None, None)
    if host is None:
        raise ConfigError(f"Ray address {address!r} is not host:port: check RAY_ADDRESS")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(f"nothing answers at the Ray cluster address {host}:{port} within {timeout:g}s "
                          f"({e.strerror or type(e).__name__}): start the cluster with `ray start --head --port "
                          f"{port}` on {host}, check the address, or {local}") from e


def cluster_nodes(cfg: PipelineConfig) -> list[dict]:
    """Join or start Ray as ``cfg.address`` says (:meth:`RayStages.connect`) and list its
    live nodes, each ``{"node_ip", "cpus", "gpus"}``."""
    ray = RayStages.connect(cfg)
    return [{"node_ip": n["NodeManagerAddress"], "cpus": n["Resources"].get("CPU", 0),
             "gpus": n["Resources"].get("GPU", 0)} for n in ray.nodes() if n.get("Alive")]


@contextlib.contextmanager
def own_ray():
    """Within it, a Ray this process joins or starts is left again on the way out (a
    private local Ray stops with it); one it was connected to before is kept."""
    try:
        import ray
    except ImportError:  # nothing to join or leave
        yield
        return
    before = ray.is_initialized()
    try:
        yield
    finally:
        if not before and ray.is_initialized():
            ray.shutdown()


def death_cause(error) -> str:
    """What Ray says of why an actor died, in a sentence: its exit type and detail (a
    signal, the OOM killer, a lost node), else the error's first line."""
    text = " ".join(str(error).split())
    exit_ = re.search(r"Worker exit type: (\S+) Worker exit detail: (.*?\.)(?:\s|$)", text)
    if exit_:
        return f"exit type {exit_[1]}: {exit_[2]}"
    node = re.search(r"The actor died because its node has died\.[^\n]*", str(error))
    if node:
        return node[0].strip()
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def _pid(actor: StageActor) -> int:
    return os.getpid()


def _sigkill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # gone already
        pass


def _describe_in_ray(actor: StageActor) -> dict:
    import ray

    return {**actor.describe(), "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": ray.util.get_node_ip_address()}


class RayStages:
    """Stage actors in a Ray placement group (the ``Stages`` a transport drives).
    :meth:`launch` brings them up (:meth:`connect`, :meth:`place`, then one actor per
    bundle); :meth:`replace` puts another in a lost one's place.

    With ``standby`` spares, the group has that many bundles more, each holding a spare:
    a started StageActor (its libraries imported, no weights) that :meth:`replace` hands
    a lost stage's range to, so no process has to start while the requests wait. The
    bundle the lost actor leaves becomes a spare's by :meth:`restock`.
    """

    remote = True

    def __init__(self, ray, pg, bundles: list[dict], envs: list[dict], stages: int, args: tuple):
        """Start ``stages`` StageActors and a spare in each bundle after them; ``args``:
        ``(store_path, device, dtype, prefetch)``, the constructor's arguments less the index."""
        self.ray, self.pg = ray, pg
        self.bundles, self.envs, self.args = bundles, envs, args
        self.slots = list(range(stages))  # each stage's bundle
        self.actors = [self.start_one(i, i) for i in range(stages)]
        self.spares: list[tuple[object, int]] = []  # (actor, bundle)
        self.free = list(range(stages, len(bundles)))  # bundles for spares, started by restock
        self.restock()

    @staticmethod
    def connect(cfg: PipelineConfig):
        """Join or start Ray as ``cfg.address`` says; returns the ``ray`` module."""
        import ray

        if cfg.address is not None and (cfg.address != "auto" or not ray.is_initialized()):
            probe_address(cfg.address, cfg.connect_timeout, cfg.messages_prefix)
        if ray.is_initialized():
            here = ray.get_runtime_context().gcs_address
            wanted = parse_address(cfg.address) if cfg.address not in (None, "auto") else None
            if wanted is not None and parse_address(here) != wanted and wanted[0] not in ("127.0.0.1", "localhost"):
                raise StageError(f"this process is already connected to the Ray cluster at {here}, so it cannot "
                                 f"join {cfg.address!r} too: pass {spell(cfg.messages_prefix, 'address', here)} "
                                 f"(or {spell(cfg.messages_prefix, 'address', 'auto')}), or start a new process for "
                                 "the other cluster")
            return ray
        kw = dict(include_dashboard=False, logging_level="WARNING", configure_logging=True)
        on_term = signal.getsignal(signal.SIGTERM)
        try:  # None: a private local Ray, never a cluster some earlier `ray start` left recorded
            ray.init(address=cfg.address or "local", **kw)
        except (ConnectionError, ValueError) as e:
            raise StageError(
                f"cannot join the Ray cluster at {cfg.address!r} ({e}): start one with `ray start --head` "
                f"on the head node, or {leave_out(cfg.messages_prefix, 'address')} for a private local Ray"
            ) from e
        finally:
            if threading.current_thread() is threading.main_thread() and on_term is not None:
                signal.signal(signal.SIGTERM, on_term)  # ray.init replaces it; the caller's stays
        return ray

    @classmethod
    def place(cls, ray, cfg: PipelineConfig, n: int, device: str, spares: int = 0
              ) -> tuple[object, list[dict], list[str], dict]:
        """Reserve a placement group of ``n`` stage bundles and ``spares`` more; returns it,
        its bundles, each bundle's node id and each node's cores."""
        from ray.util.placement_group import placement_group

        res = ray.cluster_resources()
        share = math.floor(res.get("CPU", 1) / (n + spares) * 100) / 100
        cpus = cfg.cpus_per_stage or max(0.01, min(1.0, share))
        resource = devices.kind_of(device).ray_resource  # what a stage reserves besides CPUs (GPU), if anything
        bundles = [{"CPU": cpus, **({resource: cfg.gpus_per_stage or 1} if resource else {}),
                    **(cfg.stage_resources[i] if cfg.stage_resources and i < n else {})} for i in range(n + spares)]
        what = f"{n} stages" + (f" and {spares} standby" if spares else "")
        cannot = StageError(f"the Ray cluster cannot place {what} of {bundles[0]} each (it has {dict(res)}): use "
                            "fewer stages" + (", less standby" if spares else "") + ", lower cpus_per_stage, or add nodes")
        if any(sum(b.get(k, 0) for b in bundles) > res.get(k, 0) + 1e-6 for k in ("CPU", "GPU")):
            raise cannot  # more than the whole cluster has: no use waiting
        pg = placement_group(bundles, strategy="SPREAD" if cfg.placement == "spread" else "PACK")
        try:
            ray.get(pg.ready(), timeout=120)
        except Exception as e:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(pg)
            raise cannot from e
        where = ray.util.placement_group_table(pg)["bundles_to_node_id"]
        cores = {node["NodeID"]: int(node["Resources"].get("CPU", 1)) for node in ray.nodes()}
        return pg, bundles, [where[i] for i in range(n + spares)], cores

    @classmethod
    def launch(cls, cfg: PipelineConfig, args: tuple, spares: int = 0) -> tuple["RayStages", Layout]:
        """Join Ray, place and start the stages ``cfg`` asks for (and ``spares`` spares),
        each constructed with ``(store_path, index, device, *args[1:])``; returns them and
        their layout: device, number and concurrency (no weights are loaded yet)."""
        ray = cls.connect(cfg)
        gpus = ray.cluster_resources().get("GPU", 0)
        first = layout_for(cfg, gpus)
        device, n = first.device, first.stages
        pg, bundles, nodes, cores = cls.place(ray, cfg, n, device, spares)
        placed = layout_for(cfg, gpus, nodes[:n], cores)  # the same device and number, now with the concurrency
        envs = [stage_env(device, t == cores[node]) for t, node in zip(placed.threads, nodes)]
        for node in nodes[n:]:  # a spare runs as the stages of its node do
            envs.append(next((e for e, at in zip(envs, nodes) if at == node), stage_env(device, False)))
        return cls(ray, pg, bundles, envs, n, (args[0], device, *args[1:])), placed

    def start_one(self, bundle: int, stage: int):
        """Start an actor for stage ``stage`` (-1: a spare) in bundle ``bundle`` of the placement group."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        b, env = self.bundles[bundle], self.envs[bundle]
        store_path, *rest = self.args
        return self.ray.remote(concurrency_groups={HEALTH: 1})(StageActor).options(
            num_cpus=b["CPU"], num_gpus=b.get("GPU", 0), max_concurrency=1,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=bundle),
            runtime_env={"env_vars": env} if env else None,
        ).remote(store_path, stage, *rest)

    def restock(self) -> None:
        """Start a spare in every bundle that has none (its libraries load while nothing waits on it)."""
        for bundle in self.free:
            spare = self.start_one(bundle, -1)
            self.spares.append((spare, bundle))
            self.call(spare, "warm")  # imports the stage's modules now, not when it is needed
        self.free = []

    def ping(self, actor):
        """An object ref that resolves to ``actor``'s pid once it answers on its health
        thread (which its work never blocks, ``liveness.py``)."""
        return actor.__ray_call__.options(concurrency_group=HEALTH).remote(_pid)

    def answers(self, refs) -> list[bool | None]:
        """For each ping ref: True (answered), False (its actor died) or None (no answer yet)."""
        ready = set(self.ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else set()
        out = []
        for ref in refs:
            try:
                out.append(None if ref not in ready else self.ray.get(ref) is not None)
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.ObjectLostError):
                out.append(False)
        return out

    def lost(self, timeout: float) -> dict[int, str]:
        """The stages that are dead or do not answer a ping within ``timeout`` seconds, each with why."""
        refs = [self.ping(a) for a in self.actors]
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=timeout)
        lost = {}
        for i, ref in enumerate(refs):
            if ref not in ready:
                lost[i] = f"did not answer within {timeout:g}s (heartbeat_timeout): hung or stopped"
                continue
            try:
                self.ray.get(ref)
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.ObjectLostError) as e:
                lost[i] = f"died ({death_cause(e)})"
        return lost

    def stop(self, i: int, pid: int | None, node_id: str | None) -> None:
        """End stage ``i``'s actor, and SIGKILL its process ``pid`` on ``node_id``: Ray
        leaves a stopped process alive for a while, holding its sockets open."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        try:
            self.ray.kill(self.actors[i], no_restart=True)
        except Exception:  # already gone
            pass
        if pid is not None and node_id is not None:
            self.ray.remote(_sigkill).options(
                num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(pid)

    def replace(self, i: int, pid: int | None = None, node_id: str | None = None) -> None:
        """:meth:`stop` stage ``i`` (a stopped process too) and put another in its place: a
        spare (one on ``node_id`` first), whose bundle it keeps while its own bundle waits
        for :meth:`restock`; else a new actor in its bundle (when its node is gone, Ray
        places the bundle on a node with room)."""
        self.stop(i, pid, node_id)
        if not self.spares:
            self.actors[i] = self.start_one(self.slots[i], i)
            return
        where = self.ray.util.placement_group_table(self.pg)["bundles_to_node_id"]
        k = next((k for k, (_, b) in enumerate(self.spares) if where.get(b) == node_id), 0)
        spare, bundle = self.spares.pop(k)
        self.free.append(self.slots[i])
        self.actors[i], self.slots[i] = spare, bundle

    def call(self, actor, method: str, *args):
        return getattr(actor, method).remote(*args)

    def call_with(self, actor, fn, *args):
        return actor.__ray_call__.remote(fn, *args)

    def get(self, refs, timeout: float | None = None):
        try:
            return self.ray.get(refs, timeout=timeout)
        except self.ray.exceptions.GetTimeoutError:
            raise StageLost(f"no answer from the stages within {timeout:g}s (step_timeout)") from None
        except (self.ray.exceptions.RayActorError, self.ray.exceptions.ObjectLostError) as e:
            ids = [a._actor_id.hex() for a in self.actors]
            which = f"stage {ids.index(e.actor_id)}" if getattr(e, "actor_id", None) in ids else "a pipeline stage"
            raise StageLost(f"{which} died ({death_cause(e)}); its KV caches are lost: close this "
                            "model and load it again") from e
        except self.ray.exceptions.RayTaskError as e:
            cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else None
            raise (cause or e) from None

    def describe(self, which: list[int] | None = None, timeout: float | None = None) -> list[dict]:
        which = range(len(self.actors)) if which is None else which
        return self.get([self.call_with(self.actors[i], _describe_in_ray) for i in which], timeout)

    def no_room(self, which: list[int], plans: list[PlacedStage], waited: float) -> StageError:
        """The error for replacements of stages ``which`` that did not start within ``waited``
        seconds: what each needs, and what the nodes still alive have free."""
        alive = [n for n in self.ray.nodes() if n.get("Alive")]
        free = self.ray.available_resources()
        needs = "; ".join(f"stage {i} (layers {plans[i].start}-{plans[i].end - 1}, "
                          f"{plans[i].budget_bytes or 'no'} budget bytes) needs {self.bundles[i]}" for i in which)
        return StageError(f"{needs}, but no node left has room for it within {waited:g}s (restart_timeout): "
                          f"{len(alive)} node(s) are alive with {{{', '.join(f'{k}: {v:g}' for k, v in free.items() if k in ('CPU', 'GPU'))}}} "
                          "free. Add a node (`ray start --address ...`), or close the model and load it again with "
                          "fewer stages or a smaller cpus_per_stage")

    def close(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for a in self.actors + [a for a, _ in self.spares]:
            try:
                self.ray.kill(a)
            except Exception:
                pass
        self.actors, self.spares = [], []
        if self.pg is not None:
            # bounded: when Ray itself is going down (a signal to the whole process group),
            # its control store may no longer answer, and closing must not wait on it
            done = threading.Thread(target=remove_placement_group, args=(self.pg,), daemon=True)
            done.start()
            done.join(CLOSE_TIMEOUT)
            self.pg = None


# --------------------------------------------------------------------------- planning


def plan_for(store: LayerStore, cfg: PipelineConfig, dtype: torch.dtype, described: list[dict],
             layout: Layout, stages=None, measure: bool = False) -> PlacedPlan:
    """The plan for stages that reported ``described`` (``StageActor.describe`` plus a
    node id), with where each runs: the one planning call that ``distlayer plan`` and
    :class:`Pipeline` share.

    Ranges are balanced by bytes, or by speed (``cfg.balance``, ``survey.balance_for``):
    then ``stages`` (the started ``Stages``) measure their nodes and links
    (``survey.survey``) and the ranges the cost model predicts fastest are taken
    (``planner.plan_pipeline``). With ``measure`` they measure even when ranges are
    balanced by bytes, for the prediction. The plan carries what was measured and its
    predicted step (``PlacedPlan.survey``, ``.prediction``).
    """
    sites = [Site(d["node_id"], d["node_ip"], d["free_bytes"], d["cores"], d.get("gpu", ""), d["device"],
                  d.get("host_free_bytes", 0)) for d in described]
    shape = ModelShape.from_store(store, dtype)

    choices = micro_batch_choices(layout.device, [s.node_id for s in sites], layout.concurrency[0],
                                  cfg.micro_batches is not None)

    def placed(timer=None) -> PlacedPlan:
        plan = plan_pipeline(shape, sites, cfg.budgets(len(sites)), layout.device, layout.concurrency, cfg.max_rows,
                             cfg.context, timer, choices, cfg.host_memory_per_node, cfg.block_schedule,
                             delivers_waves(cfg.transport))
        return PlacedPlan(plan, tuple(PlacedStage(p, Placement(d["node_ip"], d["node_id"], d.get("pid")))
                                      for p, d in zip(plan.stages, described)))

    by_bytes = placed()
    balance = balance_for(cfg.balance, [s.node_id for s in sites])
    if stages is None or not (measure or balance == "speed"):
        return by_bytes
    rows = -(-cfg.max_rows // max(1, min(by_bytes.micro_batches, cfg.max_rows)))
    found = survey(stages, by_bytes, store, shape, rows, [s.free_bytes for s in sites], [s.gpu for s in sites])
    timer = timer_for(shape, list(found.rates), by_bytes.plan, cfg.max_rows, cfg.context)
    if balance == "speed":
        chosen = placed(timer)
    else:
        note = "by bytes: the stages share one node (balance auto); the rates measured give the prediction only"
        chosen = dataclasses.replace(by_bytes, plan=dataclasses.replace(by_bytes.plan, balance_note=note))
    return dataclasses.replace(chosen, survey=found, prediction=predict(
        shape, chosen.plan, list(found.rates), cfg.max_rows, chosen.micro_batches, timer.context))


def layout_for(cfg: PipelineConfig, gpus: float, stage_nodes: list[str] | None = None,
               node_cores: dict[str, int] | None = None) -> Layout:
    """The pipeline's device, number of stages and concurrency for ``cfg`` with ``gpus``
    GPUs (``planner.pipeline_layout``, the one rule, with ``cfg``'s settings); its
    concurrency once ``stage_nodes`` and ``node_cores`` say where the stages were placed
    (in one process, at once)."""
    return pipeline_layout(gpus, cfg.device, cfg.stage_count_given(), cfg.gpus_per_stage, cfg.micro_batches,
                           cfg.threads_per_stage, cfg.runs_in_process, stage_nodes, node_cores)


def local_gpu(stage: int, cfg: PipelineConfig) -> str:
    """The GPU of this machine that ``stage`` runs on: in one process every stage is on
    ``cuda:0``; as Ray actors, stages fill one GPU (``gpus_per_stage`` each) before the next."""
    if cfg.runs_in_process:
        return "cuda:0"
    return f"cuda:{int(stage * (cfg.gpus_per_stage or 1) + 1e-6) % max(1, torch.cuda.device_count())}"


def plan_model(model, cfg: PipelineConfig, progress: bool = True) -> tuple[PlacedPlan, LayerStore, torch.dtype]:
    """The plan ``from_pretrained(model, **cfg)`` runs with when its stages are on this
    machine, without loading the model or starting Ray. Splits the checkpoint first if it
    has no layer store yet (that reads weights once). Unless ``cfg.balance`` is
    ``"bytes"``, this machine's rates are measured (a few of the model's layers, cached:
    ``rates.measure_node``) for the plan's predicted step.

    Returns:
        ``(plan, store, dtype)``.
    """
    store = open_configured(model, cfg, progress)
    dtype = arch.compute_dtype(cfg.dtype, store.config)
    gpus = torch.cuda.device_count()
    first = layout_for(cfg, gpus)
    device, n = first.device, first.stages
    kind = devices.kind_of(device)
    on = [local_gpu(i, cfg) for i in range(n)] if kind.ray_resource == "GPU" else [device] * n
    measured = {d: hardware.where(d) for d in set(on)}  # each stage sees its own GPU as cuda:0
    described = [{**measured[d], "node_id": "local", "device": kind.stage_device or device} for d in on]
    placed = layout_for(cfg, gpus, ["local"] * n, {"local": described[0]["cores"]})
    stages = None if cfg.balance == "bytes" else \
        LocalStages([StageActor(str(store.path), i, d, dtype, cfg.prefetch) for i, d in enumerate(on)])
    return plan_for(store, cfg, dtype, described, placed, stages, measure=True), store, dtype


def plan_on_cluster(model, cfg: PipelineConfig, progress: bool = True) -> tuple[PlacedPlan, LayerStore, torch.dtype]:
    """The plan ``from_pretrained(model, **cfg)`` runs with on the Ray cluster at
    ``cfg.address``: its stages are placed and asked where they run, as a pipeline's are,
    then stopped. Unless ``cfg.balance`` is ``"bytes"``, they measure their nodes first
    (``survey.survey``: a node whose rates are not cached gets the few layers' shards it
    measures with); nothing else is loaded or sent.

    Returns:
        ``(plan, store, dtype)``.
    """
    store = open_configured(model, cfg, progress)
    dtype = arch.compute_dtype(cfg.dtype, store.config)
    stages = None
    try:
        stages, placed = RayStages.launch(cfg, (str(store.path), dtype, cfg.prefetch))
        return plan_for(store, cfg, dtype, stages.describe(), placed, stages, cfg.balance != "bytes"), store, dtype
    finally:
        if stages is not None:
            stages.close()


# --------------------------------------------------------------------------- the pipeline


class Pipeline:
    """Stages of one model, in Ray actors or in this process.

    Args:
        store: the layer store on the driver's node (each other node gets its stages' units, ``fill.py``).
        cfg: the pipeline settings.
        dtype: compute dtype.
    """

    def __init__(self, store: LayerStore, cfg: PipelineConfig, dtype: torch.dtype):
        self.store, self.cfg, self.dtype = store, cfg, dtype
        self.stages: LocalStages | RayStages | None = None
        self.transport: Transport | None = None
        self.plan: list[PlacedStage] = []  # model.plan: each stage's frozen plan and its placement
        self.restarts = Restarts(0, cfg.max_restarts)
        self.heartbeat: Heartbeat | None = None
        self._hung: dict[int, str] = {}  # stages the heartbeat found hung: why
        self._micro = 1
        self.survey: Survey | None = None  # what was measured for placement by speed
        self.prediction: Prediction | None = None  # the cost model's step for the plan, where measured
        self.balance_note = ""  # how the ranges were chosen, in a sentence
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        cfg = self.cfg
        versions.guard(names=versions.LOCAL if cfg.runs_in_process else versions.GUARDED)
        n = cfg.stage_count_given()
        if n is not None:  # what can be checked before any stage starts or any weight is read
            check_stages(ModelShape.from_store(self.store, self.dtype), cfg.budgets(n), cfg.device or "cpu",
                         cfg.max_rows, cfg.context)
        args = (str(self.store.path), self.dtype, cfg.prefetch)
        if cfg.runs_in_process:
            placed = layout_for(cfg, torch.cuda.device_count())
            self.stages = LocalStages([StageActor(args[0], i, placed.device, *args[1:]) for i in range(placed.stages)])
        else:
            self.stages, placed = RayStages.launch(cfg, args, cfg.standby)
        s = self.stages
        described = s.describe()
        for d in described if s.remote else ():  # each node's own libraries run its stages
            versions.guard(d["versions"], versions.LOCAL, where=f"node {d['node_ip']} (stage {d['stage']})")
        plan = plan_for(self.store, cfg, self.dtype, described, placed, s)
        self.plan, self._micro = list(plan.stages), plan.micro_batches
        self.survey, self.prediction, self.balance_note = plan.survey, plan.prediction, plan.plan.balance_note
        if s.remote:  # each node gets its stages' units before they load
            fill_stages(s, self.plan, self.store, sent_before=plan.survey and plan.survey.pushed)
        self.restarts = Restarts(len(self.plan), cfg.max_restarts)
        loading = [s.call(a, "setup", p.plan) for a, p in zip(s.actors, plan.stages)]  # waited for below
        # the transport's first round of calls queues behind the loading, so both take one wait
        inner = self._connect()
        self.transport = Recovering(inner, self) if s.remote else inner
        s.get(loading)
        if s.remote:
            self.heartbeat = Heartbeat(s, cfg.heartbeat_timeout, self._on_hung)

    def _on_hung(self, i: int, why: str) -> None:
        """The heartbeat found stage ``i`` hung: kill its process and fail what waits on
        it, so that recovery replaces it now (``heal`` gives ``why`` as the cause)."""
        self._hung[i] = why
        p = self.plan[i]
        self.stages.stop(i, p.pid, p.node_id)
        transport = self.transport
        if transport is not None:
            transport.abort(f"stage {i} on {p.node_ip} (pid {p.pid}) {why}")

    def _connect(self) -> Transport:
        """A transport over the stages as they are: the registry's ``cfg.transport``
        (``transport.make``; "auto": sockets from stage to stage between Ray actors, calls
        in one process). Listening ends listen on their nodes' addresses (TCP) when the
        stages or this driver are on several nodes."""
        s = self.stages
        if not s.remote:
            return make(self.cfg.transport, s)
        here = s.ray.get_runtime_context().get_node_id()
        same_node = {p.node_id for p in self.plan} == {here}
        hosts = None if same_node else ([p.node_ip for p in self.plan], s.ray.util.get_node_ip_address())
        return make(self.cfg.transport, s, hosts, timeout=self.cfg.step_timeout)

    def heal(self, error: StageLost, old: Transport) -> tuple[Transport, list[int]]:
        """Replace the stages that died or hung (each counted against ``max_restarts``),
        empty every survivor's KV caches, and connect a new transport; returns it and the
        replaced stages. Raises ``error`` when every stage answers (nothing to replace), and
        a ``StageError`` naming the stage, its node and the cause past ``max_restarts``."""
        s = self.stages
        lost = s.lost(self.cfg.heartbeat_timeout)  # a ping its work does not block: answered at once, if alive
        if not lost:
            raise error
        for i, why in lost.items():
            p = self.plan[i]
            self.restarts.admit(i, f"{p.node_ip} (pid {p.pid})", self._hung.pop(i, why))
        old.close()
        for i in lost:
            s.replace(i, self.plan[i].pid, self.plan[i].node_id)
        survivors = [s.call(a, "reset") for i, a in enumerate(s.actors) if i not in lost]
        for i, d in zip(lost, self._replaced(list(lost))):
            p = self.plan[i].placement
            p.pid, p.node_ip, p.node_id = d.get("pid"), d["node_ip"], d["node_id"]
        fill_stages(s, self.plan, self.store, which=list(lost))  # on another node, its units go there first
        s.get(survivors + [s.call(s.actors[i], "setup", self.plan[i].plan) for i in lost], self.cfg.restart_timeout)
        return self._connect(), list(lost)

    def recovered(self) -> None:
        """After a recovery, once nothing is in flight: start spares in the bundles the lost
        stages left (their start would slow the requests it overlapped)."""
        self.stages.restock()

    def _replaced(self, which: list[int]) -> list[dict]:
        """What the replacements of stages ``which`` report once they run. A replacement
        placed on a node that was dying (Ray had not yet marked it dead, so its bundle had
        not moved) is started again, until ``restart_timeout``."""
        s, deadline = self.stages, time.monotonic() + self.cfg.restart_timeout
        while True:
            try:
                return s.describe(which, max(1.0, deadline - time.monotonic()))
            except StageLost:
                if time.monotonic() >= deadline:
                    raise s.no_room(which, self.plan, self.cfg.restart_timeout) from None
                time.sleep(1.0)
                for i in which:
                    s.replace(i)

    @property
    def remote(self) -> bool:
        """True when the stages run in Ray actors, not in this process."""
        return bool(self.stages and self.stages.remote)

    def micro_batches(self, batch: int) -> int:
        """How many micro-batches a batch of ``batch`` rows is cut into (the plan's; one
        in-process, where stages cannot overlap)."""
        return max(1, min(self._micro, batch))

    def stats(self) -> list[dict]:
        """One dict per stage: peak_weight_bytes, peak_rss_bytes, load_s, stall_s, compute_s, transfer_s, …"""
        s = self.stages
        stats = s.get([s.call(a, "stats") for a in s.actors], self.cfg.step_timeout if s.remote else None)
        return [{**st, **self.restarts.stats(i)} for i, st in enumerate(stats)]

    def close(self) -> None:
        """Stop the stages (and their actors and placement group)."""
        if self.heartbeat is not None:
            self.heartbeat.close()
            self.heartbeat = None
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        if self.stages is not None:
            self.stages.close()
            self.stages = None
