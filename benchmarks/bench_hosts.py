"""Two hosts against one: per-hop latency of stage-to-stage hand-offs over TCP against
Ray object refs, and tokens/s of a 2-stage pipeline with a stage on each of two hosts
against the same two stages on one host, in the same run.

    sudo python benchmarks/bench_hosts.py [--model DIR] [--new 32] [--repeat 3]

The two hosts are network namespaces on this machine (``tests/ray_nodes.NetnsHosts``:
a veth pair, one Ray node each, token auth, separate DISTLAYER_HOMEs); the driver runs
on host 0, which alone holds the store, so host 1's units are pushed to it at the first
start. The four pipelines (two hosts or one, TCP/Unix sockets or Ray refs) are loaded at
once, every stage computing on one thread, and their timed runs take turns. Default
model: the embedded SmolLM2-135M-Instruct (float32, greedy, batch 1). Needs root
(``ip netns``).

A hop's latency is what the receiving stage measures (``stats()["transfer_s"]``): from
the moment the stage before finished its forward to the moment this one starts its
own, per forward, for stage 1 (the hop between the hosts in the two-host runs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

DRIVER = textwrap.dedent("""
    import json, sys
    from distlayer import AutoModel
    from distlayer.bench import measure
    from distlayer.smollm import ensure_smollm2

    model_dir, address, new, repeat = sys.argv[1] or None, sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    model_dir = model_dir or ensure_smollm2(progress=None)
    two, one = [{"host_0": 0.1}, {"host_1": 0.1}], [{"host_0": 0.1}, {"host_0": 0.1}]
    runs = {"two hosts, tcp": dict(stage_resources=two, transport="auto"),
            "two hosts, ray refs": dict(stage_resources=two, transport="ray"),
            "one host, unix sockets": dict(stage_resources=one, transport="auto"),
            "one host, ray refs": dict(stage_resources=one, transport="ray")}
    models = {name: AutoModel.from_pretrained(model_dir, stages=2, address=address, progress=False,
                                              cpus_per_stage=0.5, threads_per_stage=1, **kw)
              for name, kw in runs.items()}
    tok = next(iter(models.values())).tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok([text], return_tensors="pt")["input_ids"]
    gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)

    def timed(m):  # a run's wall seconds, and stage 1's transfer seconds per forward in it
        before = m.stats()[1]["transfer_s"]
        wall = measure.wall_time(lambda: m.generate(ids, **gen))
        return wall, (m.stats()[1]["transfer_s"] - before) / new

    # a warm-up each, then the configurations take turns, so the machine's drift hits all alike
    got = measure.take_turns({name: lambda m=m: timed(m) for name, m in models.items()}, repeat)
    out = {}
    for name, m in models.items():
        walls, hops = zip(*got[name])
        tok_s = measure.per_second(new, walls)
        out[name] = {"nodes": [p.node_ip for p in m.plan], "transport": m.pipeline.transport.name,
                     "fetched": [len(p.fetched) for p in m.plan], "tok_s_best": round(tok_s[0], 2),
                     "tok_s_median": round(tok_s[1], 2),
                     "hop_ms_median": round(1000 * measure.best_and_median(hops)[1], 3)}
    for m in models.values():
        m.close()
    print("RESULT " + json.dumps(out))
""")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="", help="model dir (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--new", type=int, default=32, help="new tokens per run")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per configuration, after one warm-up")
    args = ap.parse_args()
    from ray_nodes import NetnsHosts

    root = Path(tempfile.mkdtemp(prefix="bench-hosts-"))
    homes = [root / "h0", root / "h1"]
    for h in homes:
        h.mkdir()
    hosts = NetnsHosts(homes, hide=[[], [homes[0]]], cpus=4)  # logical CPUs: every stage computes on one thread
    try:
        cmd = ["env", f"PYTHONPATH={ROOT}", "HF_HUB_OFFLINE=1", sys.executable, "-c", DRIVER, args.model,
               hosts.address, str(args.new), str(args.repeat)]
        run = hosts.run(0, cmd, timeout=3600)
    finally:
        hosts.stop()
        shutil.rmtree(root, ignore_errors=True)
    line = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
    if not line:
        sys.exit(f"the driver failed:\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}")
    got = json.loads(line[0][len("RESULT "):])
    print(f"{'configuration':<24} {'nodes':<22} {'transport':<9} {'hop ms':>8} {'tok/s best':>10} {'median':>7}")
    for name, r in got.items():
        print(f"{name:<24} {','.join(r['nodes']):<22} {r['transport']:<9} {r['hop_ms_median']:>8} "
              f"{r['tok_s_best']:>10} {r['tok_s_median']:>7}")
    print(json.dumps(got))


if __name__ == "__main__":
    main()
