"""Start and stop a private Ray cluster of several `ray start` nodes on this machine.

Each node gets its own custom resource (``node_a``, ``node_b``…), so a stage can be
pinned to a node. Only the processes of this cluster are stopped at the end (never
`ray stop`, which would end every Ray process on the machine). :class:`RayNodes` puts
every node on 127.0.0.1; :class:`NetnsHosts` gives each node a host of its own (a
network namespace with its own address), and can hold a host's processes to a share of a
CPU core with a cgroup v1 cpu quota (:func:`cpu_quota_problem` says whether it can here).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import sys
import time

RAY = os.path.join(os.path.dirname(sys.executable), "ray")  # the ray CLI beside this Python
CPU_CGROUP = "/sys/fs/cgroup/cpu"  # the cgroup v1 cpu controller's hierarchy
CFS_PERIOD_US = 100_000


def cpu_quota_problem() -> str | None:
    """Why a cgroup v1 cpu quota (``cpu.cfs_quota_us``) cannot hold processes here, or None:
    it needs root and the v1 cpu controller mounted at ``/sys/fs/cgroup/cpu``, and a group
    made there (and removed at once) must take a quota."""
    if os.geteuid() != 0:
        return "needs root for a cgroup v1 cpu quota"
    if not os.path.exists(os.path.join(CPU_CGROUP, "cpu.cfs_quota_us")):
        return f"no cgroup v1 cpu controller at {CPU_CGROUP} (cpu.cfs_quota_us)"
    probe = os.path.join(CPU_CGROUP, f"distlayer-probe-{os.getpid()}-{secrets.token_hex(3)}")
    try:
        os.mkdir(probe)
        try:
            _write(os.path.join(probe, "cpu.cfs_period_us"), CFS_PERIOD_US)
            _write(os.path.join(probe, "cpu.cfs_quota_us"), CFS_PERIOD_US // 2)
        finally:
            os.rmdir(probe)
    except OSError as e:
        return f"cannot make a cgroup v1 cpu group with a quota under {CPU_CGROUP}: {e}"
    return None


def _write(path: str, value) -> None:
    with open(path, "w") as f:
        f.write(f"{value}\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayNodes:
    """A head node plus workers, each started with ``ray start``.

    Args:
        resources: one dict of custom resources per node; the first is the head.
        cpus: CPUs each node advertises.
    """

    def __init__(self, resources: list[dict], cpus: float = 1):
        self.temp = tempfile.mkdtemp(prefix="dlray-")
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
        for i, res in enumerate(resources):
            cmd = [RAY, "start", f"--num-cpus={cpus}", f"--resources={json.dumps(res)}", "--disable-usage-stats"]
            if i == 0:
                cmd += ["--head", f"--port={self.port}", f"--temp-dir={self.temp}", "--include-dashboard=false",
                        "--node-ip-address=127.0.0.1"]
            else:
                cmd += [f"--address={self.address}", "--node-ip-address=127.0.0.1"]
            out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=180)
            if out.returncode != 0:
                self.stop()
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}")

    def stop(self) -> None:
        """Kill every process of this cluster (they all name its temp dir)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            subprocess.run(["pkill", f"-{sig.name[3:]}", "-f", self.temp], capture_output=True)
            time.sleep(2)


class NetnsHosts:
    """Two hosts on this machine, each a network namespace with its own address on a veth
    pair between them, each running one Ray node started with ``ray start`` and token auth.

    Host ``i`` gets the custom resource ``host_<i>`` and its own ``DISTLAYER_HOME``
    (``homes[i]``); ``hide[i]`` are directories host ``i`` must not see (an empty tmpfs
    is mounted over them in that host's mount namespace), so a store one host holds
    is not on the other's disk. The head runs on host 0 (``ray=False``: no Ray nodes, only
    the hosts). :meth:`run` runs a command on a host; :meth:`stop` kills exactly the
    processes in the two namespaces (all started here) and removes the namespaces.

    ``cpu_quota[i]`` (cores, e.g. ``[0.5, None]``) holds host ``i``'s processes to that
    much CPU time: a cgroup v1 cpu group of its own (``cpu.cfs_period_us`` 100000,
    ``cpu.cfs_quota_us`` cores × 100000) that every process :meth:`run` starts on the host
    joins before it execs (its ``ray start``, and so the node's raylet and Ray workers; a
    driver run there), all sharing the one quota. :meth:`stop` removes the groups once their
    processes are gone. See :func:`cpu_quota_problem`.

    Needs root and iproute2 (``ip netns``).
    """

    SUBNET = "10.77.0"
    PORT = 6379  # free: each namespace has its own ports

    def __init__(self, homes: list, hide: list[list] | None = None, cpus: float = 1, ray: bool = True,
                 cpu_quota: list[float | None] | None = None):
        tag = f"dl{os.getpid() % 100000}"
        self.names = [f"{tag}h0", f"{tag}h1"]
        self.ips = [f"{self.SUBNET}.1", f"{self.SUBNET}.2"]
        self.address = f"{self.ips[0]}:{self.PORT}"
        self.homes = [str(h) for h in homes]
        self.temp = tempfile.mkdtemp(prefix="dlhosts-")
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
                    "RAY_USAGE_STATS_ENABLED": "0"}
        self.hide, self.cpus = hide or [[], []], cpus
        self.cpu_quota = list(cpu_quota or [None, None])
        if len(self.cpu_quota) != 2:
            raise ValueError(f"cpu_quota needs one entry per host (2), not {self.cpu_quota}")
        self.cgroups: list[str | None] = [None, None]  # each host's cpu group, where it has a quota
        try:
            self._cgroups(tag)
            self._net(tag)
            for i in range(2 if ray else 0):
                self.start_node(i)
        except BaseException:
            self.stop()
            raise

    def start_node(self, i: int, cpus: float | None = None) -> None:
        """``ray start`` host ``i``'s node (the head on host 0), with ``cpus`` CPUs (default: the hosts')."""
        cmd = [RAY, "start", f"--num-cpus={cpus or self.cpus}", f"--resources={json.dumps({f'host_{i}': 1})}",
               f"--node-ip-address={self.ips[i]}", "--disable-usage-stats"]
        cmd += ["--head", f"--port={self.PORT}", f"--temp-dir={self.temp}", "--include-dashboard=false"] \
            if i == 0 else [f"--address={self.address}"]
        out = self.run(i, cmd, hide=self.hide[i], timeout=180)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} on host {i} failed:\n{out.stdout}\n{out.stderr}")

    def _cgroups(self, tag: str) -> None:
        for i, cores in enumerate(self.cpu_quota):
            if cores is None:
                continue
            if cores <= 0:
                raise ValueError(f"cpu_quota[{i}] must be a positive number of cores, not {cores}")
            path = os.path.join(CPU_CGROUP, f"distlayer-{tag}h{i}-{secrets.token_hex(3)}")
            os.mkdir(path)
            self.cgroups[i] = path
            _write(os.path.join(path, "cpu.cfs_period_us"), CFS_PERIOD_US)
            _write(os.path.join(path, "cpu.cfs_quota_us"), max(1000, round(cores * CFS_PERIOD_US)))

    def cgroup_pids(self) -> list[int]:
        """Every process in the hosts' cpu groups."""
        found = []
        for path in filter(None, self.cgroups):
            with contextlib.suppress(FileNotFoundError), open(os.path.join(path, "cgroup.procs")) as f:
                found += [int(p) for p in f.read().split()]
        return found

    def _net(self, tag: str) -> None:
        a, b = f"{tag}v0", f"{tag}v1"
        steps = [["netns", "add", self.names[0]], ["netns", "add", self.names[1]],
                 ["link", "add", a, "netns", self.names[0], "type", "veth", "peer", "name", b, "netns", self.names[1]]]
        for i, dev in enumerate((a, b)):
            steps += [["-n", self.names[i], "addr", "add", f"{self.ips[i]}/24", "dev", dev],
                      ["-n", self.names[i], "link", "set", dev, "up"], ["-n", self.names[i], "link", "set", "lo", "up"]]
        for step in steps:
            subprocess.run(["ip", *step], check=True, capture_output=True, text=True)

    def env_of(self, host: int) -> dict:
        """The environment of processes on ``host``: token auth, its DISTLAYER_HOME."""
        return {**self.env, "DISTLAYER_HOME": self.homes[host]}

    def run(self, host: int, cmd: list[str], hide: list | None = None, **kw) -> subprocess.CompletedProcess:
        """Run ``cmd`` on ``host`` (in its namespaces) with :meth:`env_of`; ``hide``: dirs it must not see."""
        mounts = "".join(f"mount -t tmpfs -o size=1m dlhide {shlex.quote(str(d))} && " for d in hide or [])
        if self.cgroups[host]:  # `ip netns exec` mounts a fresh /sys: show the cpu controller again, so the
            # host's processes see their quota (hardware.cpu_quota) as on a machine of their own
            mounts += (f"mount -t tmpfs -o size=1m dlcg /sys/fs/cgroup && mkdir /sys/fs/cgroup/cpu && "
                       f"mount -t cgroup -o cpu dlcpu /sys/fs/cgroup/cpu && ")
        shell = ["sh", "-c", f'{mounts}exec "$@"', "sh", *cmd]
        argv = ["ip", "netns", "exec", self.names[host], *shell]
        if self.cgroups[host]:  # join the host's cpu group first: `ip netns exec` hides /sys/fs/cgroup
            procs = shlex.quote(os.path.join(self.cgroups[host], "cgroup.procs"))
            argv = ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *argv]
        return subprocess.run(argv, env=self.env_of(host), capture_output=True, text=True, **kw)

    def pids(self) -> list[int]:
        """Every process in the two hosts' namespaces (and their cpu groups)."""
        found = []
        for name in self.names:
            out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
            found += [int(p) for p in out.stdout.split()]
        return sorted(set(found + self.cgroup_pids()))

    def stop(self) -> None:
        """Kill every process on the two hosts (all started by this object or its callers),
        then remove the namespaces (their veth pair goes with them) and the cpu groups."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.pids()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + 10
            while pids and time.time() < deadline and self.pids():
                time.sleep(0.2)
        for name in self.names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        shutil.rmtree(self.temp, ignore_errors=True)
        left = []
        for i, path in enumerate(self.cgroups):
            deadline = time.time() + 10
            while path:  # a group goes only once empty; a killed process may take a moment to leave it
                try:
                    os.rmdir(path)
                except FileNotFoundError:
                    pass
                except OSError:
                    if time.time() < deadline:
                        time.sleep(0.2)
                        continue
                    left.append(path)
                self.cgroups[i] = path = None
        if left:
            raise RuntimeError(f"cannot remove the cpu groups {left}: processes are still in them")
