"""``fedrlhf bench round``: one whole federation per aggregation kind, CPU and wall seconds, on this machine.

Each federation is a ``fedrlhf run`` in its own process, exactly as a user starts it (start-up
imports included), timed by the CPU time the child process used (``getrusage(RUSAGE_CHILDREN)``:
user + system, robust to other jobs sharing the cores) and by wall clock. ``--repeats`` runs every
cell that many times, interleaved (cell after cell, then again), and reports medians;
``--baseline-tree`` also times another checkout of the project (e.g. a clone of ``main``) with the
same command, interleaved with this one, so the speed-up is a same-run ratio. The load average is
recorded before and after every run. The issue's targets ("the default federation finishes in
under 3 minutes on 2 CPU cores"; secagg ≤ 1.2× and ckks ≤ 1.6× plain CPU) are checked here, not in
timed tests.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..commands.options import add_overrides
from .report import markdown_table, update_section, write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="configs/movielens.yaml", help="run config the benchmark measures (default configs/movielens.yaml)")
    add_overrides(p)
    p.add_argument("--data-dir", type=Path, default=None, help="datasets directory (default: $FEDRLHF_DATA_DIR)")
    p.add_argument("--aggregations", nargs="+", default=["plain"], help="aggregation kinds to time side by side")
    p.add_argument("--repeats", type=int, default=1, help="runs per cell, interleaved; medians are reported (default 1)")
    p.add_argument(
        "--baseline-tree",
        type=Path,
        default=None,
        help="another checkout of the project (e.g. a clone of main) to time with the same commands, interleaved",
    )
    p.add_argument("--json", type=Path, default=Path("bench/round.json"), help="where the JSON results go (default bench/round.json)")
    p.add_argument("--render-only", action="store_true", help="run nothing: print (and with --doc, write) the table of --json")
    p.add_argument(
        "--doc",
        type=Path,
        default=None,
        help="also rewrite this Markdown file's section with the table (e.g. BENCHMARKS.md; default: print it)",
    )


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_run(tree: Path, config: str, overrides: list[str], data_dir: Path | None) -> dict[str, Any]:
    """One ``fedrlhf run`` of ``tree``'s code in a child process: CPU and wall seconds, its per-round numbers."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "fedrlhf_secure.cli", "run", config, "--out", tmp, "--no-progress"]
        for o in overrides:
            cmd += ["--set", o]
        if data_dir is not None:
            cmd += ["--data-dir", str(data_dir)]
        env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
        load_before = os.getloadavg()[0]
        cpu0, t0 = _children_cpu(), time.perf_counter()
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=False)
        wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
        load_after = os.getloadavg()[0]
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} (in {tree}) exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        runs = [p for p in Path(tmp).iterdir() if p.is_dir() and not p.is_symlink()]
        if len(runs) != 1:
            raise RuntimeError(f"expected one run directory in {tmp}, found {[p.name for p in runs]}")
        history = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((runs[0] / "summary.json").read_text())
    return {
        "cpu_seconds": cpu,
        "wall_seconds": wall,
        "load_before": load_before,
        "load_after": load_after,
        "clients": summary["num_clients"],
        "rounds": len(history),
        "seconds_per_round_median": statistics.median(h["seconds"] for h in history),
        "seconds_fit_median": statistics.median(h["seconds_fit"] for h in history),
        "seconds_aggregation_median": statistics.median(h["seconds_aggregation"] for h in history),
        "seconds_eval_median": statistics.median(h["seconds_eval"] for h in history),
        "heldout_accuracy": history[-1].get("heldout_accuracy"),
        "bytes_up_per_client": history[-1]["bytes_up_per_client"],
        "bytes_down_per_client": history[-1]["bytes_down_per_client"],
    }


def render(payload: dict[str, Any], doc: Path | None) -> None:
    """Print the table of a results payload (as written to ``--json``); with ``doc``, rewrite its section."""
    results = payload["results"]
    rows = []
    for r in results:
        m = r["median"]
        rows.append(
            [
                r["tree"],
                r["aggregation"],
                m["clients"],
                m["rounds"],
                r["repeats"],
                m["cpu_seconds"],
                m["wall_seconds"],
                r["cpu_vs_plain"] if r["cpu_vs_plain"] is not None else "",
                r["baseline_cpu_over_this"] if r["baseline_cpu_over_this"] is not None else "",
                m["seconds_fit_median"],
                m["seconds_aggregation_median"],
                m["seconds_eval_median"],
                m["heldout_accuracy"],
                f"{min(min(x['load_before'], x['load_after']) for x in r['runs']):.1f}–"
                f"{max(max(x['load_before'], x['load_after']) for x in r['runs']):.1f}",
            ]
        )
    table = markdown_table(
        [
            "tree",
            "aggregation",
            "clients",
            "rounds",
            "runs",
            "CPU s (median)",
            "wall s (median)",
            "CPU / plain",
            "baseline CPU / this",
            "fit wall s/round",
            "aggregation wall s/round",
            "eval wall s/round",
            "held-out acc",
            "load (1-min)",
        ],
        rows,
    )
    sets = "".join(f" --set {o}" for o in payload.get("overrides", []))
    update_section(doc, "round", f"### One federation (`fedrlhf bench round --config {payload['config']}{sets}`)\n\n{table}")


def summarise(samples: dict[tuple[str, str], list[dict[str, Any]]], trees: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    """Medians per (tree, aggregation) and the same-run ratios, as written to ``--json``."""
    results = []
    for (name, kind), runs in samples.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], (int, float)) and runs[0][k] is not None}
        results.append({"tree": name, "path": str(trees[name]), "aggregation": kind, "repeats": len(runs), "median": med, "runs": runs})
    by = {(r["tree"], r["aggregation"]): r["median"] for r in results}
    for r in results:
        plain = by.get((r["tree"], "plain"))
        r["cpu_vs_plain"] = r["median"]["cpu_seconds"] / plain["cpu_seconds"] if plain else None
        base = by.get(("baseline", r["aggregation"]))
        r["baseline_cpu_over_this"] = base["cpu_seconds"] / r["median"]["cpu_seconds"] if base and r["tree"] == "this" else None
    payload = {"config": args.config, "overrides": args.overrides, "trees": {k: str(v) for k, v in trees.items()}, "results": results}
    return payload


def run(args: argparse.Namespace) -> int:
    if args.render_only:
        render(json.loads(args.json.read_text()), args.doc)
        return 0
    here = Path.cwd()
    trees = {"this": here}
    if args.baseline_tree is not None:
        if not (args.baseline_tree / "fedrlhf_secure").is_dir():
            from ..errors import InputError

            raise InputError(f"--baseline-tree {args.baseline_tree}: no fedrlhf_secure package there")
        trees["baseline"] = args.baseline_tree
    data_dir = args.data_dir.resolve() if args.data_dir is not None else None
    config = str(Path(args.config).resolve())
    samples: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rep in range(max(1, args.repeats)):
        for kind in args.aggregations:
            for name, tree in trees.items():
                res = time_run(tree, config, [*args.overrides, f"aggregation.kind={kind}"], data_dir)
                samples.setdefault((name, kind), []).append(res)
                write_json(args.json, summarise(samples, trees, args))  # partial results survive an interrupted bench
                print(json.dumps({"repeat": rep, "tree": name, "aggregation": kind, **res}), flush=True)
    payload = summarise(samples, trees, args)
    write_json(args.json, payload)
    render(payload, args.doc)
    print(f"results: {args.json}" + (f" and {args.doc}" if args.doc else ""))
    return 0
