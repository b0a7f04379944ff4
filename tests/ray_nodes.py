"""Start and stop a private Ray cluster of several `ray start` nodes on this machine.

Each node gets its own custom resource (``node_a``, ``node_b``…), so a stage can be
pinned to a node. Only the processes of this cluster are stopped at the end (never
`ray stop`, which would end every Ray process on the machine).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import sys
import time

RAY = os.path.join(os.path.dirname(sys.executable), "ray")  # the ray CLI beside this Python

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
        import json

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
