"""``distlayer doctor``: will this machine give right answers, and how fast can it go.

One row per check, each ``ok``, ``FAIL`` (with what to change) or ``skip``:

- the version of each library that decides distlayer's answers against its tested range;
- the CPU and RAM, and the GPUs (with what torch can use of them);
- Ray: a private local Ray started (or the cluster at ``--address`` joined), its nodes;
- the read speed of the disk that holds the layer store;
- the correctness canary (:mod:`distlayer.canary`), on every device kind present, in
  process and on two Ray stages that stream their layers, against transformers.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import canary, devices, hardware, versions
from .config import PipelineConfig
from .errors import DistlayerError
from .pipeline import cluster_nodes, own_ray
from .planner import fmt_bytes

OK, FAIL, SKIP = "ok", "FAIL", "skip"
DISK_TEST_BYTES = 256 * 2**20   # written, dropped from the page cache and read back
_CHUNK = 8 * 2**20


@dataclass
class Row:
    """One line of the doctor's table: the check, its status, what it found or what to
    change, and the numbers behind it (for ``--json``)."""

    check: str
    status: str
    detail: str
    numbers: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """``{check, ok, status, detail, ...numbers}``; ``ok`` is None for a skipped check."""
        return {"check": self.check, "ok": None if self.status == SKIP else self.status == OK,
                "status": self.status, "detail": self.detail, **self.numbers}


def run_doctor(model: str, cfg: PipelineConfig, say: Callable[[str], object] = lambda m: None) -> list[Row]:
    """Every check, in order, for ``model`` and the Ray cluster ``cfg.address`` (None: a
    private local Ray, stopped at the end).

    Raises:
        DistlayerError: ``model`` cannot be found (before any check runs).
    """
    from transformers.utils import logging as hf_logging

    config = canary.model_config(model)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' loading bars, one per canary run
    rows = version_rows() + device_rows()
    say("starting Ray ..." if cfg.address is None else f"joining Ray at {cfg.address} ...")
    try:
        with own_ray():
            ray_row = check_ray(cfg)
            rows.append(ray_row)
            say("timing the disk ...")
            rows.append(check_disk(store_folder(model)))
            rows += canary_rows(config, cfg, ray_row, say)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return rows


def format_rows(rows: list[Row]) -> str:
    """The rows as an aligned table: check, status, detail."""
    from .report import table

    return table([{"check": r.check, "status": r.status, "detail": r.detail} for r in rows])


# --------------------------------------------------------------------------- versions and devices


def version_rows() -> list[Row]:
    """One row per guarded library: installed version against the tested range."""
    return [Row(f"{c.name} version", OK if c.ok else FAIL,
                f"{c.installed} (tested: {c.supported})" if c.ok else c.sentence(),
                {"installed": c.installed, "supported": c.supported})
            for c in versions.checks()]


def device_rows() -> list[Row]:
    """The CPU and RAM; the GPUs where there are any, failing when the driver sees a GPU
    that torch cannot use."""
    cores, free = hardware.cores(), hardware.free_bytes("cpu")
    rows = [Row("cpu", OK, f"{cores} cores, {fmt_bytes(free)} RAM available",
                {"cores": cores, "ram_available_bytes": free})]
    import torch

    names, driver_cuda = hardware.nvidia_smi()
    if torch.cuda.is_available():
        rows.append(_gpu_row(torch))
    elif names:
        rows.append(Row("gpu", FAIL, _unusable_gpus(torch, names, driver_cuda), {"driver_gpus": names}))
    return rows


def _gpu_row(torch) -> Row:
    """Each GPU torch sees, with its free memory."""
    gpus = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        gpus.append({"name": torch.cuda.get_device_name(i), "free_bytes": free, "total_bytes": total})
    shown = "; ".join(f"cuda:{i} {g['name']}, {fmt_bytes(g['free_bytes'])} free of {fmt_bytes(g['total_bytes'])}"
                      for i, g in enumerate(gpus))
    return Row("gpu", OK, f"{shown} (torch {torch.__version__}, CUDA {torch.version.cuda})",
               {"gpus": gpus, "torch_cuda": torch.version.cuda})


def _unusable_gpus(torch, names: list[str], driver_cuda: str | None) -> str:
    """Why torch cannot use the GPUs ``nvidia-smi`` sees, and what to install."""
    seen = f"nvidia-smi sees {len(names)} GPU(s) ({', '.join(names)})"
    wheel = f"pip install \"torch{versions.supported().get('torch', '')}\" --index-url " \
            "https://download.pytorch.org/whl/cu128"
    if torch.version.cuda is None:
        return (f"{seen}, but torch {torch.__version__} is built without CUDA: install a CUDA build "
                f"(`{wheel}`, the cuNNN matching your driver)")
    return (f"{seen}, but torch {torch.__version__} (built for CUDA {torch.version.cuda}) cannot use them; the "
            f"driver supports CUDA {driver_cuda or 'unknown'}: update the NVIDIA driver, or install a torch built "
            f"for CUDA {driver_cuda or 'your driver supports'} or older")


# --------------------------------------------------------------------------- Ray and disk


def check_ray(cfg: PipelineConfig) -> Row:
    """Start a private local Ray (``cfg.address`` None) or join the cluster at
    ``cfg.address``, the way a pipeline does; its nodes with their CPUs and GPUs."""
    where = cfg.address or "a private local Ray"
    try:
        nodes = cluster_nodes(cfg)
    except ImportError:
        wanted = versions.supported().get("ray", "")
        return Row("ray cluster", FAIL, f'ray is not installed: run `pip install "ray[default]{wanted}"` (only '
                                        "stages=0 runs without it)")
    except DistlayerError as e:
        return Row("ray cluster", FAIL, str(e))
    except Exception as e:  # what Ray raises for a cluster it cannot join (auth, version) is not one type
        return Row("ray cluster", FAIL, f"cannot join {where} ({_first_line(e)}): start it with `ray start "
                                        "--head`, fix the address, or give this process the cluster's token "
                                        "(RAY_AUTH_MODE=token and RAY_AUTH_TOKEN, or ~/.ray/auth_token)")
    auth = os.environ.get("RAY_AUTH_MODE", "")  # Ray sets it when it turns token auth on by itself
    shown = "; ".join(f"{n['node_ip']}: {n['cpus']:g} CPUs, {n['gpus']:g} GPUs" for n in nodes)
    how = f"joined {cfg.address}" if cfg.address else "started a private local Ray"
    return Row("ray cluster", OK, f"{how} ({versions.installed().get('ray')}), {len(nodes)} node(s): {shown}; "
                                  f"token auth {'on' if auth == 'token' else 'off'} (RAY_AUTH_MODE={auth or 'unset'})",
               {"nodes": nodes, "gpus": sum(n["gpus"] for n in nodes), "token_auth": auth == "token"})


def store_folder(model: str) -> Path:
    """The folder of ``model``'s layer store when it has one, else ``DISTLAYER_HOME``
    (nothing is split, converted or downloaded; a repo id's store is not looked for)."""
    from .smollm import default_dir, is_default
    from .sources import MANIFEST, default_shards_dir, home_dir, is_checkpoint, resolve_source

    if is_default(model):
        model = str(default_dir()) if is_checkpoint(default_dir()) else ""
    if model and Path(model).expanduser().exists():
        store = default_shards_dir(resolve_source(model))
        if (store / MANIFEST).is_file():
            return store
    return home_dir()


def check_disk(folder: Path, nbytes: int = DISK_TEST_BYTES) -> Row:
    """Read speed of ``folder``'s disk: a file of ``nbytes`` written there, dropped from
    the page cache, read back and removed."""
    from .bench.measure import read_bandwidth

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".distlayer-doctor-") as f:
            block = os.urandom(_CHUNK)  # not zeros: a compressing file system would read those for free
            for _ in range(nbytes // _CHUNK):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())  # only clean pages can be dropped from the page cache
            speed = read_bandwidth([f.name], cold=True)
    except OSError as e:
        return Row("disk", FAIL, f"cannot write and read {fmt_bytes(nbytes)} in {folder} ({e.strerror or e}): free "
                                 "space there, or set DISTLAYER_HOME (or --shards-dir) to a writable disk")
    gbs = (speed["bytes_per_s"] or 0) / 1e9
    return Row("disk", OK, f"{gbs:.2f} GB/s reading {fmt_bytes(nbytes)} from {folder}, page cache dropped",
               {"read_gb_s": round(gbs, 3), "folder": str(folder)})


# --------------------------------------------------------------------------- the canary


def canary_rows(config, cfg: PipelineConfig, ray_row: Row, say: Callable[[str], object]) -> list[Row]:
    """The canary on every device kind here, in process and on two streaming Ray stages
    (skipped without Ray), each against transformers on the same device."""
    kinds = [k.name for k in devices.KINDS.values() if k.here()]
    with tempfile.TemporaryDirectory(prefix="distlayer-canary-") as tmp:
        try:
            path = canary.make_canary(config, Path(tmp) / "model")
            streaming = canary.streaming_settings(path)
        except Exception as e:
            return [Row("canary", FAIL, f"cannot build a tiny {config.model_type} ({_first_line(e)}): distlayer runs "
                                        "decoder-only causal LMs with model.layers, model.norm and lm_head")]
        ids, mask, pad = canary.prompts(config)
        rows = []
        for kind in kinds:
            say(f"canary on {kind} ...")
            rows += _kind_rows(kind, path, streaming, ids, mask, pad, cfg, ray_row)
    return rows


def _kind_rows(kind: str, path: Path, streaming: dict, ids, mask, pad: int, cfg: PipelineConfig,
               ray_row: Row) -> list[Row]:
    """The canary on device ``kind``: in process, then on two Ray stages that stream."""
    try:
        ref = canary.reference(path, ids, mask, kind)
    except Exception as e:
        return [Row(f"canary {kind}", FAIL, f"transformers cannot run the canary on {kind} ({_first_line(e)}): "
                                            "see the device rows")]
    rows = [_canary_row(f"canary {kind}, in process", path, ref, ids, mask, pad, stages=0, device=kind)]
    name = f"canary {kind}, 2 Ray stages streaming"
    skip = _ray_skip(kind, ray_row)
    rows.append(Row(name, SKIP, skip) if skip else _canary_row(
        name, path, ref, ids, mask, pad, stages=2, device=kind, address=cfg.address, connect_timeout=cfg.connect_timeout,
        **streaming, **({"gpus_per_stage": 0.5} if devices.kind_of(kind).ray_resource else {})))
    return rows


def _ray_skip(kind: str, ray_row: Row) -> str | None:
    """Why the Ray canary on ``kind`` cannot run, or None."""
    if ray_row.status != OK:
        return "no Ray: see the ray cluster row"
    if devices.kind_of(kind).ray_resource == "GPU" and not ray_row.numbers.get("gpus"):
        return "the Ray cluster has no GPU"
    return None


def _canary_row(name: str, path: Path, ref, ids, mask, pad: int, **settings) -> Row:
    """Run the canary through distlayer with ``settings``; the row compares it with ``ref``."""
    tv = versions.installed().get("transformers")
    try:
        run = canary.run_distlayer(path, ids, mask, **settings)
    except Exception as e:
        hint = "" if isinstance(e, DistlayerError) else \
            ": fix what the rows above report; if they are all ok, report this table as a distlayer bug"
        return Row(name, FAIL, f"the canary did not run: {_first_line(e)}{hint}")
    numbers = {"tokens_per_s": round(run.tokens_per_s, 1), "new_tokens": run.new_tokens,
               "streamed_bytes": run.streamed_bytes}
    diff = canary.first_difference(run.sequences, ref, ids.shape[1], pad)
    if diff is None:
        streamed = f", {fmt_bytes(run.streamed_bytes)} of weights streamed" if run.streamed_bytes else ""
        return Row(name, OK, f"greedy tokens identical to transformers {tv}'s generate (2 prompts, one "
                             f"left-padded, {canary.NEW_TOKENS} new tokens each{streamed}; "
                             f"{run.tokens_per_s:.0f} tokens/s)", {"identical": True, **numbers})
    step, row, ours, theirs = diff
    fix = next((c.fix for c in versions.checks(names=("transformers",))), "pip install transformers")
    return Row(name, FAIL, f"greedy tokens differ from transformers' generate at new token {step} of "
                           f"{canary.NEW_TOKENS} (prompt {row}: distlayer {ours}, transformers {theirs}) with "
                           f"transformers {tv}: answers here are wrong. Install a tested transformers (`{fix}`); "
                           "if it is one already, report this table as a distlayer bug",
               {"identical": False, "first_difference_step": step, **numbers})


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
