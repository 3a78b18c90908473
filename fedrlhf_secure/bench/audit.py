"""``fedrlhf bench audit``: a 16-shadow LiRA audit of the default MovieLens run, timed.

Target (issue 6): the whole audit (16 shadow federations on random halves of the candidates, all
attacks, metrics, plots) in under 15 minutes on 2 CPU cores. Both the wall time and the CPU time
of this process and its worker processes are recorded: each training process is single-threaded,
so on an otherwise idle machine wall ≈ CPU / (worker processes), and on a shared one the CPU time is
the figure that does not depend on the neighbours. The audited run itself is trained first and
timed separately. Writes ``bench/audit.json`` and the ``audit`` section of
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from ..commands.options import add_overrides
from .report import markdown_table, update_section, write_json

TARGET_SECONDS = 15 * 60


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished (joined) worker processes."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="configs/movielens.yaml", help="run config the benchmark measures (default configs/movielens.yaml)")
    add_overrides(p)
    p.add_argument("--data-dir", type=Path, default=None, help="datasets directory (default: $FEDRLHF_DATA_DIR)")
    p.add_argument("--shadows", type=int, default=16, help="shadow runs of the LiRA audit (default 16)")
    p.add_argument("--canaries", type=int, default=0, help="also run the one-run ε audit with this many canaries")
    p.add_argument("--json", type=Path, default=Path("bench/audit.json"), help="where the JSON results go (default bench/audit.json)")
    p.add_argument(
        "--doc",
        type=Path,
        default=None,
        help="also rewrite this Markdown file's section with the table (e.g. BENCHMARKS.md; default: print it)",
    )
    p.add_argument("--workers", type=int, default=None, help="worker processes for the audit's training runs (2 uses both cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..commands.audit import audit_with_progress  # the CLI front door is the runtime's only way to the attacks
    from ..config import load_config
    from ..federation.engine import RunOptions, run_federation

    config = load_config(args.config, args.overrides)
    with tempfile.TemporaryDirectory(prefix="fedrlhf-bench-audit-") as tmp:
        t0 = time.perf_counter()
        run_dir = run_federation(config, RunOptions(data_dir=args.data_dir, out=Path(tmp), progress=not args.no_progress))
        target_seconds = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), _cpu_seconds()
        report = audit_with_progress(
            run_dir,
            args.data_dir,
            show_progress=not args.no_progress,
            num_shadows=args.shadows,
            num_canaries=args.canaries,
            workers=args.workers,
        )
        audit_seconds = time.perf_counter() - t0
        audit_cpu_seconds = _cpu_seconds() - c0
    attacks = report["released_parameters"]["attacks"]
    result = {
        "target_run_seconds": target_seconds,
        "audit_seconds": audit_seconds,
        "audit_cpu_seconds": audit_cpu_seconds,
        "shadow_seconds": report["released_parameters"]["shadow_seconds"],
        "seconds_per_shadow": report["released_parameters"]["shadow_seconds"] / max(args.shadows, 1),
        "target_seconds": TARGET_SECONDS,
        "within_target": audit_seconds < TARGET_SECONDS,
        "candidates": report["released_parameters"]["candidates"],
        "members": report["released_parameters"]["members"],
        "attacks": attacks,
        "epsilon": report.get("epsilon"),
    }
    write_json(
        args.json, {"config": args.config, "overrides": args.overrides, "shadows": args.shadows, "workers": args.workers, "results": result}
    )
    rows = [[name, m["auc"], m["tpr_at_0_1pct_fpr"], m["tpr_at_1pct_fpr"], m["balanced_accuracy"]] for name, m in attacks.items()]
    body = (
        f"### Membership audit (`fedrlhf bench audit --config {args.config}`, {args.shadows} shadow runs)\n\n"
        f"Audit {audit_seconds:.0f} s wall, {audit_cpu_seconds:.0f} s CPU incl. worker processes (single-threaded torch; "
        f"wall ≈ CPU / workers on an idle machine; target < {TARGET_SECONDS} s wall on 2 cores; "
        f"{result['seconds_per_shadow']:.1f} s wall per shadow run), "
        f"audited run {target_seconds:.0f} s; {result['members']} members / {result['candidates'] - result['members']} non-members.\n\n"
        + markdown_table(["attack", "AUC", "TPR@0.1%FPR", "TPR@1%FPR", "balanced acc."], rows)
    )
    update_section(args.doc, "audit", body)
    print(body)
    print(f"wrote {args.json} and the audit section of {args.doc}")
    return 0
