"""Every file in ``examples/`` runs as its docstring says a user runs it, with the embedded
SmolLM2-135M-Instruct, and gives real answers: a renamed function cannot break one silently.

Each example runs in its own process with this Python (and the ``distlayer`` script beside
it), sharing the session's ``DISTLAYER_HOME``, so the model converted and split once by the
``smollm_store`` fixture is reused rather than built again.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).parents[1] / "examples"
DISTLAYER = str(Path(sys.executable).parent / "distlayer")  # the console script beside this Python


def run(cmd: list, cwd: Path, env: dict | None = None) -> str:
    """Run ``cmd`` to the end; returns its stdout, failing with its output if it fails."""
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def stage_pids(out: str) -> list[int]:
    """The pids of the stage table that ``examples/driver.py`` prints (format_plan)."""
    lines = out.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.split()[:3] == ["stage", "node", "pid"])
    rows = [ln.split() for ln in lines[head + 1:]]
    return [int(r[2]) for r in rows[:next((i for i, r in enumerate(rows) if not r), len(rows))]]


def driver(tmp_path: Path, *args: str, env: dict | None = None) -> tuple[str, list[int]]:
    """``python examples/driver.py --stages 2 ARGS``: the answer (what precedes the plan) and the stages' pids."""
    out = run([sys.executable, EXAMPLES / "driver.py", "--stages", "2", "--max-new-tokens", "12", *args],
              cwd=tmp_path, env=env)
    return out.split("\nstage ")[0], stage_pids(out)


def test_driver_on_a_local_ray(smollm_store, tmp_path):
    answer, pids = driver(tmp_path)
    assert "Paris" in answer, answer
    assert len(set(pids)) == 2


def test_driver_on_a_ray_start_cluster(smollm_store, tmp_path):
    from ray_nodes import RayNodes

    nodes = RayNodes([{}], cpus=2)  # its own head: private temp dir and port, token auth; stops only itself
    try:
        # as README's "A Ray cluster" runs it: `--address auto` (here RAY_ADDRESS names this head)
        answer, pids = driver(tmp_path, "--address", "auto", env={**nodes.env, "RAY_ADDRESS": nodes.address})
        logs = [p.name for p in Path(nodes.temp).glob("session_*/logs/worker-*.out")]
    finally:
        nodes.stop()
        shutil.rmtree(nodes.temp, ignore_errors=True)
    assert "Paris" in answer, answer
    for pid in pids:  # the stages were workers of that cluster, not of a Ray of the driver's own
        assert any(name.endswith(f"-{pid}.out") for name in logs), (pid, logs)


def test_batch_answers_every_question(smollm_store, tmp_path):
    script = EXAMPLES / "batch.py"
    tree = ast.parse(script.read_text())
    questions = next(ast.literal_eval(n.value) for n in tree.body
                     if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "questions")
    out = run([sys.executable, script], cwd=tmp_path)
    asked = [ln[3:] for ln in out.splitlines() if ln.startswith("Q: ")]
    answers = [ln[3:].strip() for ln in out.splitlines() if ln.startswith("A: ")]
    assert asked == questions, out
    assert len(answers) == len(questions) and all(answers), out
    assert "Paris" in answers[questions.index("What is the capital of France?")], out


def test_client_against_distlayer_serve(smollm_store, tmp_path):
    from test_serve import Server

    server = Server("default", "--stages", "2")  # `distlayer serve default` on a free port, once it answers
    try:
        out = run([sys.executable, EXAMPLES / "client.py", "--url", server.url + "/v1"], cwd=tmp_path)
    finally:
        server.stop()  # SIGTERM: a clean exit, no traceback
    answer = next(ln for ln in out.splitlines() if ln.startswith("A: "))
    assert "Paris" in answer, out
    haiku = out.split("Streaming a haiku:", 1)[1]
    assert len(haiku.split()) >= 5, out


def test_ray_data_answers_every_prompt(smollm_store, tmp_path):
    out = run([sys.executable, EXAMPLES / "ray_data.py", "--out", tmp_path / "answers"], cwd=tmp_path)
    ids = [json.loads(ln)["id"] for ln in (EXAMPLES / "prompts.jsonl").read_text().splitlines() if ln.strip()]
    answers = dict(ln.split(": ", 1) for ln in out.splitlines() if ": " in ln and ln.split(": ", 1)[0] in ids)
    assert sorted(answers) == sorted(ids), out
    assert all(a and not a.startswith("error") for a in answers.values()), out
    assert "Paris" in answers["capital-fr"], out


def test_job_file_through_distlayer_run(smollm_store, tmp_path):
    for name in ("job.yaml", "prompts.jsonl"):  # the job writes beside its file: keep it out of the repo
        shutil.copy(EXAMPLES / name, tmp_path / name)
    run([DISTLAYER, "run", tmp_path / "job.yaml"], cwd=tmp_path)
    ids = [json.loads(ln)["id"] for ln in (tmp_path / "prompts.jsonl").read_text().splitlines() if ln.strip()]
    results = [json.loads(ln) for ln in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in results) == sorted(ids)  # one line per prompt id
    assert all(r["text"].strip() and "error" not in r for r in results), results
    assert "Paris" in next(r["text"] for r in results if r["id"] == "capital-fr")
    before = (tmp_path / "results.jsonl").read_text()
    run([DISTLAYER, "run", tmp_path / "job.yaml"], cwd=tmp_path)  # a rerun resumes: nothing left to do
    assert (tmp_path / "results.jsonl").read_text() == before
