"""What the machine running this process has: free memory, cores, its address, peak RSS,
the GPUs its NVIDIA driver sees."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess

from . import devices


def free_bytes(device: str) -> int:
    """Bytes ``device`` has free now: a GPU's free memory, or the node's available RAM
    (its kind's ``free_bytes``, ``devices.DeviceKind``)."""
    return devices.kind_of(device).free(device)


def ram_free_bytes(device: str = "cpu") -> int:
    """The node's available RAM (a CPU's free bytes)."""
    import psutil

    return int(psutil.virtual_memory().available)


def cuda_free_bytes(device: str) -> int:
    """A CUDA GPU's free memory."""
    import torch

    return int(torch.cuda.mem_get_info(torch.device(device))[0])


def gpu_id(device: str) -> str:
    """Which physical GPU ``device`` is (its UUID, the same in every process whatever
    ``CUDA_VISIBLE_DEVICES`` calls it); ``""`` for a CPU."""
    return devices.kind_of(device).physical(device)


def cuda_id(device: str) -> str:
    """Which physical CUDA GPU ``device`` is: its UUID (else its name and index)."""
    import torch

    props = torch.cuda.get_device_properties(torch.device(device))
    return str(getattr(props, "uuid", "") or f"{props.name}#{torch.device(device).index or 0}")


def where(device: str) -> dict:
    """What a stage on ``device`` reports of where it runs: the node's address and cores,
    the bytes the device has free, the node's available RAM (for a GPU stage's pinned host
    tier) and which physical GPU it is (``""`` on a CPU)."""
    return {"node_ip": local_ip(), "cores": cores(), "free_bytes": free_bytes(device),
            "host_free_bytes": ram_free_bytes(), "gpu": gpu_id(device)}


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_quota() -> float | None:
    """Cores' worth of CPU time this process's cgroup allows (its ``cpu.max``, or cgroup
    v1's ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``); None when unlimited or unknown."""
    try:
        lines = open("/proc/self/cgroup").read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        try:
            if controllers == "":  # cgroup v2
                quota, period = open(f"/sys/fs/cgroup{path}/cpu.max").read().split()
                return None if quota == "max" else int(quota) / int(period)
            if "cpu" in controllers.split(","):
                base = f"/sys/fs/cgroup/{controllers}{path}"
                quota = int(open(f"{base}/cpu.cfs_quota_us").read())
                return None if quota < 0 else quota / int(open(f"{base}/cpu.cfs_period_us").read())
        except (OSError, ValueError):
            continue
    return None


def local_ip() -> str:
    """This machine's address (best effort)."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM; unlike ru_maxrss, not inherited
    from the parent process)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def nvidia_smi() -> tuple[list[str], str | None]:
    """The GPUs the NVIDIA driver sees (``nvidia-smi``), by name, and the newest CUDA its
    driver supports (``"12.4"``); ``([], None)`` where there is no ``nvidia-smi`` or it fails."""
    if shutil.which("nvidia-smi") is None:
        return [], None
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=20, check=True).stdout
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return [], None
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", header)
    return [n.strip() for n in names.splitlines() if n.strip()], cuda[1] if cuda else None
