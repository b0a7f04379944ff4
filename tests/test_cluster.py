"""cluster/: the `ray up` configs against Ray's own cluster-config schema and loader, the
KubeRay manifest against the fields KubeRay reads, the scripts through `bash -n` and
shellcheck (when installed), and the scripts for real on two namespace hosts."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).parent.parent / "cluster"
RAY_UP = ["onprem.yaml", "aws-small-gpus.yaml"]
SCRIPTS = sorted(CLUSTER.glob("*.sh"))


def ray_schema() -> dict:
    """The cluster-config schema the installed Ray validates `ray up` configs with."""
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.mark.parametrize("name", RAY_UP)
def test_ray_up_configs_pass_rays_schema(name):
    import jsonschema

    config = yaml.safe_load((CLUSTER / name).read_text())
    jsonschema.validate(config, ray_schema())


@pytest.mark.parametrize("name", RAY_UP)
def test_ray_up_configs_pass_rays_loader(name):
    """What `ray up` does with the file before it touches a machine: provider defaults
    filled in (the local provider's node types made), then validated."""
    util = pytest.importorskip("ray.autoscaler._private.util")
    config = util.prepare_config(yaml.safe_load((CLUSTER / name).read_text()))
    util.validate_config(config)
    assert config["head_node_type"] in config["available_node_types"]
    if config["provider"]["type"] == "local":
        assert config["max_workers"] == len(config["provider"]["worker_ips"])
    else:
        gpus = [t for t in config["available_node_types"].values() if t["resources"].get("GPU")]
        assert gpus and all(t["max_workers"] >= t["min_workers"] >= 1 for t in gpus)


@pytest.mark.parametrize("name", RAY_UP)
def test_ray_up_configs_start_ray_with_token_auth_and_a_store_home(name):
    config = yaml.safe_load((CLUSTER / name).read_text())
    for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "RAY_AUTH_MODE=token" in cmd and "DISTLAYER_HOME=" in cmd and "ray stop" not in cmd
    assert "~/.ray/auth_token" in config["file_mounts"]  # every node gets the head's token


DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def check_pod(template: dict, where: str, gpu: bool) -> None:
    """A pod template as KubeRay needs it: containers with a name and image, the Ray
    container first; token auth and DISTLAYER_HOME on a mounted volume."""
    spec = template["spec"]
    containers = spec["containers"]
    assert containers and all(c.get("name") and c.get("image") for c in containers), where
    ray_c = containers[0]
    env = {e["name"]: e for e in ray_c.get("env", [])}
    assert env["RAY_AUTH_MODE"]["value"] == "token", where
    assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"], where
    home = env["DISTLAYER_HOME"]["value"]
    mounts = {m["mountPath"]: m["name"] for m in ray_c.get("volumeMounts", [])}
    assert home in mounts and mounts[home] in {v["name"] for v in spec.get("volumes", [])}, where
    if "$KUBERAY_GEN_RAY_START_CMD" in " ".join(ray_c.get("args", [])):
        assert ray_c["command"][:2] == ["/bin/bash", "-lc"], where
    limits = ray_c.get("resources", {}).get("limits", {})
    assert ("nvidia.com/gpu" in limits) == gpu, where


def test_kuberay_manifest_has_what_kuberay_reads():
    docs = [d for d in yaml.safe_load_all((CLUSTER / "kuberay.yaml").read_text()) if d]
    assert len(docs) == 1
    rc = docs[0]
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    assert DNS1123.match(rc["metadata"]["name"])
    annotations = rc["metadata"].get("annotations", {})
    assert all(isinstance(v, str) for v in annotations.values())
    spec = rc["spec"]
    assert re.match(r"^\d+\.\d+\.\d+$", spec["rayVersion"])
    head = spec["headGroupSpec"]
    groups = spec["workerGroupSpecs"]
    for where, group in [("head", head), *((g["groupName"], g) for g in groups)]:
        params = group["rayStartParams"]  # KubeRay takes a map of strings
        assert isinstance(params, dict) and all(isinstance(v, str) for v in params.values()), where
        if "resources" in params:  # a JSON object, quoted once more for the shell
            assert isinstance(json.loads(json.loads(params["resources"])), dict), where
    uses_cmd = any("$KUBERAY_GEN_RAY_START_CMD" in " ".join(c.get("args", []))
                   for g in [head, *groups] for c in g["template"]["spec"]["containers"])
    assert not uses_cmd or annotations.get("ray.io/overwrite-container-cmd") == "true"
    check_pod(head["template"], "head", gpu=False)
    assert groups and len({g["groupName"] for g in groups}) == len(groups)
    for g in groups:
        assert DNS1123.match(g["groupName"])
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        check_pod(g["template"], g["groupName"], gpu=True)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    if shutil.which("shellcheck"):
        out = subprocess.run(["shellcheck", "-x", "-s", "bash", str(script)], capture_output=True, text=True,
                             cwd=CLUSTER.parent)
        assert out.returncode == 0, out.stdout


def test_readme_names_every_file():
    readme = (CLUSTER / "README.md").read_text()
    for f in CLUSTER.iterdir():
        if f.name != "README.md":
            assert f.name in readme, f.name


@pytest.mark.slow
def test_scripts_start_join_check_and_stop_two_hosts(tmp_path):
    """The manual path for real: start-head.sh on one namespace host, join-worker.sh on
    the other, check.sh sees both nodes, stop.sh on each leaves no process behind."""
    from test_hosts import can_make_hosts

    why = can_make_hosts()
    if why:
        pytest.skip(why)
    from ray_nodes import RAY, NetnsHosts

    homes = [tmp_path / "h0", tmp_path / "h1"]
    hosts = NetnsHosts(homes, ray=False)
    try:
        token = hosts.env["RAY_AUTH_TOKEN"]
        common = ["env", f"RAY={RAY}", "NUM_CPUS=1", f"RAY_AUTH_TOKEN={token}", f"RAY_TEMP={hosts.temp}"]
        head = hosts.run(0, [*common, f"NODE_IP={hosts.ips[0]}", "bash", str(CLUSTER / "start-head.sh")], timeout=200)
        assert head.returncode == 0, head.stdout + head.stderr
        assert f"HEAD={hosts.address}" in head.stdout
        join = hosts.run(1, [*common, f"NODE_IP={hosts.ips[1]}", f"HEAD={hosts.address}", 'RESOURCES={"desk_b": 1}',
                             "bash", str(CLUSTER / "join-worker.sh")], timeout=200)
        assert join.returncode == 0, join.stdout + join.stderr
        for _ in range(30):
            check = hosts.run(0, [*common, f"HEAD={hosts.address}", "bash", str(CLUSTER / "check.sh")], timeout=60)
            if check.stdout.count("node_") >= 2 and "desk_b" in check.stdout:
                break
            time.sleep(2)
        assert check.stdout.count("node_") >= 2 and "desk_b" in check.stdout, check.stdout + check.stderr
        for host in (1, 0):
            stop = hosts.run(host, [*common, "bash", str(CLUSTER / "stop.sh")], timeout=60)
            assert stop.returncode == 0, stop.stdout + stop.stderr
            assert not (homes[host] / "cluster" / "ray.pid").exists()
        left = hosts.pids()
        assert not left, [Path(f"/proc/{p}/cmdline").read_text().replace("\0", " ")[:200] for p in left]
    finally:
        hosts.stop()
