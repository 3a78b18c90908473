"""``fedrlhf bench scale``: CPU cost of one federation round for 100, 1,000 and 10,000 simulated clients.

The clients are MovieLens users resampled into synthetic users
(:func:`fedrlhf_secure.tasks.movielens.data.resample_users`: a bootstrap of real users' rating sets
with the items permuted within genre signature; docs/movielens.md), one client each, run by the
embedded simulation exactly as ``fedrlhf run`` does (over 256 clients the run is split across
several in-process participant hosts, :data:`~fedrlhf_secure.federation.engine.IN_PROCESS_HOST_CLIENTS`).

Each round is timed by this process's CPU time (user + system; robust to other jobs on the cores)
and by wall clock, separately from the set-up (building the synthetic task, every client and the
participant hosts). The growth is fitted two ways: a least-squares line of round CPU seconds
against clients (its slope × 1,000 is the marginal cost per 1,000 clients) and the exponent of a
log-log fit (1 = linear). The issue's target, "10,000 clients complete a round, at most 5 CPU s per
1,000 clients for plain", is reported, not asserted. JSON (strict) and a log-log plot with units.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..commands.options import add_overrides
from .report import markdown_table, process_cpu_seconds, update_section, write_json

TARGET_CPU_PER_1000 = 5.0
"""CPU seconds per 1,000 clients per plain round (issue 16)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="configs/movielens.yaml", help="run config (default configs/movielens.yaml)")
    add_overrides(p)
    p.add_argument("--data-dir", type=Path, default=None, help="datasets directory (default: $FEDRLHF_DATA_DIR)")
    p.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 10000], help="simulated client counts (default 100 1000 10000)")
    p.add_argument("--rounds", type=int, default=1, help="rounds timed per client count; the median is reported (default 1)")
    p.add_argument("--json", type=Path, default=Path("bench/scale.json"), help="where the JSON results go (default bench/scale.json)")
    p.add_argument("--plot", type=Path, default=Path("bench/scale.png"), help="where the plot goes (default bench/scale.png)")
    p.add_argument("--doc", type=Path, default=None, help="also rewrite this Markdown file's section (e.g. BENCHMARKS.md)")
    p.add_argument(
        "--real-users",
        action="store_true",
        help="sizes up to the data's user count use the real users (a seeded sample; all at 943 on ML-100K) instead of resampled ones",
    )
    p.add_argument("--render-only", action="store_true", help="run nothing: print (and with --doc, write) the table of --json")


def measure(config: Any, split: Any, num_clients: int, rounds: int, out: Path, *, real_users: bool = False) -> dict[str, Any]:
    """Set-up and per-round CPU/wall seconds of ``rounds`` rounds with ``num_clients`` synthetic users
    (with ``real_users``, when the data has at least ``num_clients`` users: a seeded sample of the
    real ones, all of them at the data's user count, as ``task.num_clients`` picks them)."""
    from ..federation.engine import Federation, RunOptions
    from ..rundir import RunDirectory
    from ..tasks.movielens.data import resample_users
    from ..tasks.movielens.task import MovieLensTask

    load_before = os.getloadavg()[0]
    c0, w0 = process_cpu_seconds(), time.perf_counter()
    real = real_users and num_clients <= split.catalogue.num_users
    if real:
        users = split.catalogue.num_users
        task = MovieLensTask(replace(config.task.params, num_clients=None if num_clients == users else num_clients), split, config.seed)
    else:
        task = MovieLensTask(config.task.params, resample_users(split, num_clients, config.seed), config.seed)
    records = len(task.training_records())
    run = RunDirectory.create(out, f"scale-{num_clients}")
    fed = Federation(config, run, RunOptions(out=out, progress=False, task=task))
    setup_cpu, setup_wall = process_cpu_seconds() - c0, time.perf_counter() - w0
    hosts = len(getattr(getattr(fed.link, "inner", fed.link), "hosts", {0: None}))  # in-process participant hosts
    round_cpu, round_wall, accuracy = [], [], None
    try:
        for r in range(rounds):
            c1, w1 = process_cpu_seconds(), time.perf_counter()
            log = fed.core.run_round(r)
            round_cpu.append(process_cpu_seconds() - c1)
            round_wall.append(time.perf_counter() - w1)
            accuracy = log.row.get("heldout_accuracy")
    finally:
        fed.close()
        run.discard()
    cpu = statistics.median(round_cpu)
    return {
        "clients": num_clients,
        "users": "real" if real else "resampled",
        "records": records,
        "in_process_hosts": hosts,
        "setup_cpu_seconds": setup_cpu,
        "setup_wall_seconds": setup_wall,
        "round_cpu_seconds": round_cpu,
        "round_wall_seconds": round_wall,
        "round_cpu_seconds_median": cpu,
        "round_wall_seconds_median": statistics.median(round_wall),
        "cpu_seconds_per_1000_clients": cpu / num_clients * 1000.0,
        "heldout_accuracy": accuracy,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }


def fit_growth(clients: list[int], cpu: list[float]) -> dict[str, float | None]:
    """Least-squares line ``cpu = a + b·clients`` and log-log exponent ``cpu ∝ clients^k``."""
    if len(clients) < 2:
        return {
            "intercept_cpu_seconds": None,
            "cpu_seconds_per_client": None,
            "cpu_seconds_per_1000_clients": None,
            "loglog_exponent": None,
        }
    x, y = np.asarray(clients, dtype=np.float64), np.asarray(cpu, dtype=np.float64)
    slope, intercept = np.polyfit(x, y, 1)
    exponent, _ = np.polyfit(np.log(x), np.log(y), 1)
    return {
        "intercept_cpu_seconds": float(intercept),
        "cpu_seconds_per_client": float(slope),
        "cpu_seconds_per_1000_clients": float(slope * 1000.0),
        "loglog_exponent": float(exponent),
    }


def plot(path: Path, rows: list[dict[str, Any]], growth: dict[str, Any], kind: str) -> None:
    from ..plots import _pyplot

    plt = _pyplot()
    x = np.array([r["clients"] for r in rows], dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.loglog(x, [r["round_cpu_seconds_median"] for r in rows], "o-", label=f"{kind} round, CPU s (median)")
    ax.loglog(x, [r["setup_cpu_seconds"] for r in rows], "s--", label="set-up (task, clients, hosts), CPU s")
    ax.loglog(x, TARGET_CPU_PER_1000 * x / 1000.0, ":", color="grey", label=f"target: {TARGET_CPU_PER_1000:g} CPU s per 1,000 clients")
    if growth.get("loglog_exponent") is not None:
        ax.set_title(
            f"growth exponent {growth['loglog_exponent']:.2f}, {growth['cpu_seconds_per_1000_clients']:.2f} CPU s per 1,000 clients"
        )
    ax.set_xlabel("simulated clients (resampled MovieLens users, one each)")
    ax.set_ylabel("CPU seconds")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(payload: dict[str, Any], doc: Path | None) -> None:
    """Print the table of a results payload (as written to ``--json``); with ``doc``, rewrite its section."""
    rows, growth = payload["rows"], payload["growth"]
    table = markdown_table(
        [
            "clients",
            "users",
            "records",
            "hosts",
            "round CPU s",
            "round wall s",
            "CPU s per 1,000 clients",
            "set-up CPU s",
            "peak RSS MiB",
            "held-out acc",
            "load (1-min)",
        ],
        [
            [
                r["clients"],
                r.get("users", "resampled"),
                r["records"],
                r["in_process_hosts"],
                r["round_cpu_seconds_median"],
                r["round_wall_seconds_median"],
                r["cpu_seconds_per_1000_clients"],
                r["setup_cpu_seconds"],
                r["peak_rss_mib"],
                r["heldout_accuracy"],
                f"{r['load_before']:.1f}–{r['load_after']:.1f}",
            ]
            for r in rows
        ],
    )
    fit = (
        f"Least-squares line: {growth['intercept_cpu_seconds']:.3g} CPU s + "
        f"{growth['cpu_seconds_per_1000_clients']:.3g} CPU s per 1,000 clients; "
        f"log-log exponent {growth['loglog_exponent']:.3f}."
        if growth["loglog_exponent"] is not None
        else ""
    )
    rounds = max(len(r["round_cpu_seconds"]) for r in rows)
    sizes = " ".join(str(r["clients"]) for r in rows)
    heading = (
        f"### Scale (`fedrlhf bench scale --config {payload['config']} --clients {sizes} --rounds {rounds}`, {payload['aggregation']})"
    )
    plot_path = payload.get("plot", "bench/scale.png")
    update_section(doc, "scale", f"{heading}\n\n{table}\n\n{fit}\n\n![round CPU vs clients]({plot_path})")


def run(args: argparse.Namespace) -> int:
    if args.render_only:
        render(json.loads(args.json.read_text()), args.doc)
        return 0
    from ..config import load_config
    from ..federation.engine import build_task, resolve_data_dir

    config = load_config(args.config, [*args.overrides, f"federation.rounds={args.rounds}"])
    if config.task.kind != "movielens":
        from ..errors import InputError

        raise InputError(f"{args.config}: bench scale resamples MovieLens users; task.kind is {config.task.kind!r}")
    split = build_task(config, resolve_data_dir(args.data_dir)).split  # the real users the synthetic ones are drawn from
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sorted(args.clients):
            res = measure(config, split, n, args.rounds, Path(tmp), real_users=args.real_users)
            rows.append(res)
            print(
                f"{n} clients: round {res['round_cpu_seconds_median']:.2f} CPU s ({res['cpu_seconds_per_1000_clients']:.2f} per 1,000), "
                f"set-up {res['setup_cpu_seconds']:.2f} CPU s, load {res['load_before']:.1f}",
                flush=True,
            )
    growth = fit_growth([r["clients"] for r in rows], [r["round_cpu_seconds_median"] for r in rows])
    kind = config.aggregation.kind
    largest = rows[-1]
    target = {
        "cpu_seconds_per_1000_clients_max": TARGET_CPU_PER_1000,
        "largest_clients": largest["clients"],
        "largest_completed": True,
        "met": all(r["cpu_seconds_per_1000_clients"] <= TARGET_CPU_PER_1000 for r in rows),
    }
    payload = {
        "config": args.config,
        "overrides": args.overrides,
        "rounds": args.rounds,
        "plot": str(args.plot),
        "aggregation": kind,
        "rows": rows,
        "growth": growth,
        "target": target,
    }
    write_json(args.json, payload)
    plot(args.plot, rows, growth, kind)
    render(payload, args.doc)
    print(f"results: {args.json}, {args.plot}" + (f" and {args.doc}" if args.doc else ""))
    return 0
