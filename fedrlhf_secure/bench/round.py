"""``fedrlhf bench round``: wall-clock of one whole federation, per round, on this machine.

The issue's target ("the default federation finishes in under 3 minutes on 2 CPU cores") is
checked here, not in a timed test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from ..commands.options import add_overrides
from .report import markdown_table, update_section, write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="configs/movielens.yaml", help="run config the benchmark measures (default configs/movielens.yaml)")
    add_overrides(p)
    p.add_argument("--data-dir", type=Path, default=None, help="datasets directory (default: $FEDRLHF_DATA_DIR)")
    p.add_argument("--aggregations", nargs="+", default=["plain"], help="aggregation kinds to time side by side")
    p.add_argument("--json", type=Path, default=Path("bench/round.json"), help="where the JSON results go (default bench/round.json)")
    p.add_argument(
        "--doc",
        type=Path,
        default=None,
        help="also rewrite this Markdown file's section with the table (e.g. BENCHMARKS.md; default: print it)",
    )


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..federation.engine import RunOptions, run_federation

    rows, results = [], []
    for kind in args.aggregations:
        config = load_config(args.config, [*args.overrides, f"aggregation.kind={kind}"])
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            path = run_federation(config, RunOptions(data_dir=args.data_dir, out=Path(tmp), progress=True))
            total = time.perf_counter() - t0
            history = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
            summary = json.loads((path / "summary.json").read_text())
        per_round = [h["seconds"] for h in history]
        res = {
            "aggregation": kind,
            "clients": summary["num_clients"],
            "rounds": len(history),
            "seconds_total": total,
            "seconds_per_round_median": statistics.median(per_round),
            "seconds_fit_median": statistics.median(h["seconds_fit"] for h in history),
            "seconds_aggregation_median": statistics.median(h["seconds_aggregation"] for h in history),
            "seconds_eval_median": statistics.median(h["seconds_eval"] for h in history),
            "heldout_accuracy": history[-1].get("heldout_accuracy"),
            "bytes_up_per_client": history[-1]["bytes_up_per_client"],
            "bytes_down_per_client": history[-1]["bytes_down_per_client"],
        }
        results.append(res)
        rows.append(
            [
                kind,
                res["clients"],
                res["rounds"],
                res["seconds_total"],
                res["seconds_per_round_median"],
                res["seconds_fit_median"],
                res["seconds_aggregation_median"],
                res["seconds_eval_median"],
                res["heldout_accuracy"],
                res["bytes_up_per_client"],
                res["bytes_down_per_client"],
            ]
        )
        print(json.dumps(res))
    write_json(args.json, {"config": args.config, "overrides": args.overrides, "results": results})
    table = markdown_table(
        [
            "aggregation",
            "clients",
            "rounds",
            "total s",
            "s/round (median)",
            "fit s",
            "aggregation s",
            "eval s",
            "held-out acc",
            "bytes up/client",
            "bytes down/client",
        ],
        rows,
    )
    update_section(args.doc, "round", f"### One federation (`fedrlhf bench round --config {args.config}`)\n\n{table}")
    print(f"results: {args.json}" + (f" and {args.doc}" if args.doc else ""))
    return 0
