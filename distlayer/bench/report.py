"""What a benchmark run writes: ``bench.json``, ``bench.md`` (a markdown table) and
``bench.png`` (tokens/s against the memory budget, one line per system, the rooflines
dotted), each with the machine described."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from pathlib import Path

FLAT = ("transformers in memory", "AirLLM")   # no budget: drawn as horizontal lines
ROOFLINE = "roofline (dotted): bytes a step streams / read bandwidth"
PACKAGES = ("torch", "transformers", "accelerate", "safetensors", "ray", "airllm", "distlayer")


def describe_machine() -> dict:
    """Cores, memory, CPU model and the versions of what ran."""
    import psutil
    import torch

    cpu = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"cpu": cpu, "cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "ram_bytes": psutil.virtual_memory().total, "gpu": torch.cuda.get_device_name(0)
            if torch.cuda.is_available() else None, "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "versions": versions}


def best_bandwidth(result: dict, name: str, mode: str) -> float | None:
    """The best read bandwidth measured for a file set and mode, bytes per second."""
    got = [m["bytes_per_s"] for m in result["bandwidth"].get(name, {}).get(mode, []) if m.get("bytes_per_s")]
    return max(got) if got else None


def mb(n) -> str:
    """Bytes as decimal megabytes: ``651 MB``, ``4.2 MB``."""
    if n is None:
        return ""
    return f"{n / 1e6:.1f} MB" if n < 1e7 else f"{n / 1e6:.0f} MB"


def num(x: float | None) -> str:
    """Three significant figures (whole numbers from 1000): ``0.0123``, ``12.3``, ``1234``."""
    if x is None:
        return ""
    return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def _best_median(row: dict, key: str, unit: str = "") -> str:
    if row.get(key) is None:
        return ""
    median = row.get(f"{key}_median")
    return f"{num(row[key])}{unit}" + (f" ({num(median)}{unit})" if median is not None else "")


def _per_stage(row: dict, key: str) -> str:
    return " / ".join(mb(st.get(key)) for st in row.get("stages_stats", []) if st.get(key) is not None)


def machine_lines(result: dict) -> list[str]:
    """The machine and model, as markdown lines."""
    m, info = result["machine"], result["model"]
    v = m["versions"]
    lines = [f"- machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.1f} GiB RAM"
             + (f", GPU {m['gpu']}" if m.get("gpu") else "") + f"; Python {m['python']}, "
             + ", ".join(f"{k} {v[k]}" for k in PACKAGES if v.get(k))]
    for name, what in (("store", "the distlayer store"), ("checkpoint", "the checkpoint"),
                       ("airllm", "AirLLM's shards")):
        cold, warm = best_bandwidth(result, name, "cold"), best_bandwidth(result, name, "warm")
        if cold or warm:
            parts = ([f"{cold / 1e9:.2f} GB/s cold (from disk)"] if cold else []) + \
                    ([f"{warm / 1e9:.2f} GB/s warm (page cache)"] if warm else [])
            lines.append(f"- read bandwidth of {what}, best of the run: {', '.join(parts)}")
    lines.append(f"- model: {info['model']} ({info['architecture']}, {info['layers']} layers, hidden "
                 f"{info['hidden_size']}, {info['dtype']}, {mb(info['weight_bytes'])} of weights in the store)")
    s = result["settings"]
    lines.append(f"- greedy, {s['new']} new tokens a run (AirLLM {min(s['airllm_new'], s['new'])}), a warm-up run "
                 f"then {s['repeat']} timed runs each, in turns; {result['loading']}")
    return lines


def markdown(result: dict, plot: str | None) -> str:
    """``bench.md``: the machine, one table row per configuration, batch and cache mode,
    then notes and skipped configurations."""
    out = ["# distlayer bench", "", *machine_lines(result), "",
           "tok/s: decode tokens per second (after the first token), best run (median); budget: weights per "
           "stage as a share of the model's; floor: bytes a step streams over the read bandwidth measured in "
           "the same run for that cache mode; roofline: floor / step time (1.0 = at the speed of the reads). "
           "Cold runs drop the files from the page cache at every token the driver receives: a pipeline that "
           "runs steps ahead of the driver, or reads ahead, can still find some pages cached, so a roofline above "
           "1 means the step read less than its bytes from disk. The time the drops take is taken out of the "
           "times of systems that run in this process (they wait for it); Ray stages run on while the driver "
           "drops, so theirs keep it.", "",
           "| configuration | batch | cache | tok/s | TTFT ms | step ms | streamed / step | floor ms | roofline "
           "| vs transformers | vs AirLLM | peak weights / stage | peak RSS / stage |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for r in sorted(result["rows"], key=lambda r: (r["batch"], r["mode"] != "warm")):
        tok = _best_median(r, "decode_tok_s") or _best_median(r, "tok_s")
        out.append(" | ".join(["", r["label"], str(r["batch"]), r["mode"], tok, _best_median(r, "ttft_ms"),
                               _best_median(r, "step_ms"), mb(r["bytes_per_step"]) if r["bytes_per_step"] else "",
                               num(r.get("floor_ms")), _best_median(r, "roofline_fraction"),
                               _best_median(r, "vs_transformers", "x"), _best_median(r, "vs_airllm", "x"),
                               _per_stage(r, "peak_weight_bytes"), _per_stage(r, "peak_rss_bytes"), ""]).strip())
        notes += [f"{r['label']}: {n}" for n in r.get("notes", []) if f"{r['label']}: {n}" not in notes]
    if notes:
        out += ["", "Notes:", *[f"- {n}" for n in notes]]
    if result["skipped"]:
        out += ["", "Skipped:", *[f"- {s['label']}: {s['reason']}" for s in result["skipped"]]]
    out += ["", f"![tokens/s against the memory budget]({plot})" if plot else
            "No plot: matplotlib is not installed (pip install 'distlayer[bench]')."]
    return "\n".join(out) + "\n"


def plot(result: dict, path: Path) -> bool:
    """``bench.png``: per cache mode and batch, tokens/s against the budget (resident at
    100%), one line per system, each streaming line's roofline dotted in its colour, the
    systems without a budget as horizontal lines. False when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    rows = result["rows"]
    modes = [m for m in ("warm", "cold") if any(r["mode"] == m for r in rows)]
    batches = sorted({r["batch"] for r in rows})
    if not modes or not batches:
        return False
    fig = Figure(figsize=(max(9, 6 * len(batches)), 4.5 * len(modes) + 1), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(modes), len(batches), squeeze=False)
    series = sorted({r["series"] for r in rows})
    colours = {s: f"C{i % 10}" for i, s in enumerate(series)}
    for i, mode in enumerate(modes):
        for j, b in enumerate(batches):
            _panel(axes[i][j], [r for r in rows if r["mode"] == mode and r["batch"] == b], colours)
            axes[i][j].set_title(f"{mode} page cache, batch {b}")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes.flat[1:]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if any(r.get("roofline_tok_s") for r in rows):
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], color="gray", linestyle=":", marker="_", markersize=14))
        labels.append(ROOFLINE)
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize="small")
    info = result["model"]
    fig.suptitle(f"{Path(info['model']).name}: tokens/s against the memory budget ({result['machine']['cores']} "
                 f"cores, {result['machine']['ram_bytes'] / 2**30:.0f} GiB)")
    fig.savefig(path, dpi=110)
    return True


def _panel(ax, rows: list[dict], colours: dict) -> None:
    """One mode and batch: a line per series over budgets; flat systems as horizontal lines."""
    def speed(r):
        return r.get("decode_tok_s") or r.get("tok_s")

    for name in sorted({r["series"] for r in rows}):
        pts = sorted((r["budget"] or 1.0, speed(r), r.get("roofline_tok_s")) for r in rows
                     if r["series"] == name and speed(r))
        if not pts:
            continue
        if name in FLAT:
            ax.axhline(pts[0][1], color=colours[name], linestyle="--", label=name)
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colours[name], label=name)
        roof = [(p[0], p[2]) for p in pts if p[2]]
        if roof:
            ax.plot([p[0] for p in roof], [p[1] for p in roof], linestyle=":", marker="_", markersize=14,
                    color=colours[name], label="_roofline")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = sorted({r["budget"] or 1.0 for r in rows})
    ax.set_xticks(ticks, [("resident" if t == 1.0 else f"{100 * t:g}%") for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("memory budget per stage (share of the weights)")
    ax.set_ylabel("tokens/s")
    ax.grid(True, which="both", alpha=0.3)


def write(result: dict, out: Path) -> dict[str, Path | None]:
    """Write ``bench.json``, ``bench.md`` and (with matplotlib) ``bench.png`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    png = out / "bench.png"
    drawn = plot(result, png)
    if not drawn and png.exists():
        png.unlink()
    (out / "bench.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "bench.md").write_text(markdown(result, png.name if drawn else None))
    return {"json": out / "bench.json", "md": out / "bench.md", "png": png if drawn else None}
