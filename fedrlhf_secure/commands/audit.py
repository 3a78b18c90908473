"""``fedrlhf audit RUN_DIR``: membership-inference audit and ε lower bound of a run; a CI gate.

Before any training it prints the ε audit's plan: which canaries (the run's own gradient canaries
when it was trained with ``privacy.audit_canaries``, else a re-run), m, the largest ε that m can
refute, and the m the claim needs; an audit that cannot refute the claim ends ``INCONCLUSIVE``
(exit 0, with a warning) or, with ``--require-power``, is refused before it runs (exit 2).

Exit status: 0 when the audit passes or is inconclusive (or the run claims no DP), 1 when the
empirical lower bound ε̂ exceeds the ε the run's ledger claims (the claim is then refuted at the
stated confidence),
2 for bad input (missing run directory, files or data): settings errors and
:class:`~attacks.shadows.AuditUnsupported` are :class:`~fedrlhf_secure.errors.InputError`,
which ``fedrlhf_secure.cli.main`` reports and turns into exit status 2 like every other command's.

The CLI is the front door to :mod:`attacks`: only modules under ``fedrlhf_secure/commands`` import
it, the runtime library never does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from attacks.audit import AuditSettings, audit_run, progress_steps

from ..errors import ClaimRefuted, InputError

EXIT_CLAIM_REFUTED = ClaimRefuted.exit_status


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a completed run directory (from `fedrlhf run`)")
    parser.add_argument("--data-dir", type=Path, default=None, help="dataset directory (default: $FEDRLHF_DATA_DIR)")
    d = AuditSettings()
    parser.add_argument(
        "--shadows",
        type=int,
        default=d.num_shadows,
        help=f"shadow runs for LiRA/RMIA/reference attacks (0: LOSS only; default {d.num_shadows})",
    )
    parser.add_argument(
        "--canaries",
        type=int,
        default=None,
        help="record canaries: a re-run with M extra ratings instead of the gradient-canary audit (0: no ε audit; "
        "weak: 1,000 can refute at most ε = 5.27)",
    )
    parser.add_argument(
        "--gradient-canaries",
        type=int,
        default=None,
        help="white-box gradient canaries of the re-run ε audit (client or record level; default: sized to the claim; 0: none). "
        "A run trained with privacy.audit_canaries is audited on its own canaries instead",
    )
    parser.add_argument(
        "--require-power",
        action="store_true",
        help="refuse (exit 2, before any training) an ε audit whose m cannot refute the claimed ε",
    )
    parser.add_argument("--confidence", type=float, default=d.confidence, help="confidence of ε̂ (default 0.95)")
    parser.add_argument(
        "--server-view", action="store_true", help="also attack what the server sees: one client's plain update vs a secure aggregate"
    )
    parser.add_argument(
        "--server-view-clients",
        type=int,
        default=d.server_view_clients,
        help=f"clients in the aggregate (>= 50; default {d.server_view_clients})",
    )
    parser.add_argument(
        "--server-view-kind", default=d.server_view_kind, help=f"secure aggregator for the server view (default {d.server_view_kind})"
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="the audit's own randomness (canary coins, halves)")
    parser.add_argument(
        "--workers", type=int, default=None, help="worker processes for the audit's training runs (default: the run's federation.workers)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="LOSS attack and the ε audit only (--shadows 0): one extra training run instead of 17"
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the ROC plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    run_dir: Path = args.run_dir
    if not run_dir.is_dir():
        raise InputError(f"run directory not found: {run_dir}")
    shadows = 0 if args.quick else args.shadows
    print(estimated_cost(run_dir, shadows, args.server_view), flush=True)
    report = audit_with_progress(
        run_dir,
        args.data_dir,
        show_progress=not args.no_progress,
        num_shadows=shadows,
        num_canaries=args.canaries,
        gradient_canaries=args.gradient_canaries,
        require_power=args.require_power,
        confidence=args.confidence,
        seed=args.seed,
        server_view=args.server_view,
        server_view_clients=args.server_view_clients,
        server_view_kind=args.server_view_kind,
        plots=not args.no_plots,
        workers=args.workers,
    )
    print(format_report(report))
    print(f"wrote {run_dir / 'audit.json'}")
    if report["verdict"] == "inconclusive":
        print("WARNING: INCONCLUSIVE: this audit's m could not refute the claimed ε; it is not a pass", file=sys.stderr)
    return EXIT_CLAIM_REFUTED if report["verdict"] == "fail" else 0


def estimated_cost(run_dir: Path, shadows: int, server_view: bool) -> str:
    """What the audit will train, and about how long, from the run's own duration (printed first).
    A run that carries its own canaries (``privacy.audit_canaries``) needs no canary re-run."""
    import json

    from ..privacy.canaries import CANARY_DIR, PLAN_FILE

    own = (run_dir / CANARY_DIR / PLAN_FILE).is_file()
    runs = shadows + int(not own) + int(server_view)
    canary = "the ε audit scores the run's own canaries" if own else "one canary re-run"
    try:
        seconds = float(json.loads((run_dir / "summary.json").read_text())["seconds_total"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"audit plan: {runs} training run(s) of this config ({shadows} shadows; {canary})"
    if runs == 0:
        return f"audit plan: no training ({canary}; {shadows} shadows)"
    minutes = runs * seconds / 60
    quick = "" if shadows == 0 else f"; --quick (LOSS + the ε audit) trains {int(not own)}"
    pace = f"about {minutes:.1f} min at the run's own pace"
    return f"audit plan: {runs} training run(s) of this config ({shadows} shadows; {canary}), {pace}{quick}"


def audit_with_progress(run_dir: Path, data_dir: Path | None, *, show_progress: bool = True, noise=None, **settings) -> dict:
    """:func:`attacks.audit.audit_run` with :class:`~attacks.audit.AuditSettings` ``settings`` and a
    progress display on stderr; the one way the runtime reaches the attacks (``fedrlhf bench audit`` too)."""
    from .. import progress

    resolved = AuditSettings(**settings)
    bar = progress.bar(progress_steps(resolved), "audit", "training run", show=show_progress)
    try:
        return audit_run(
            run_dir, data_dir, resolved, progress=bar.set_postfix_str, step=lambda: bar.update(1), noise=noise, announce=_announce
        )
    finally:
        bar.close()


def _announce(text: str) -> None:
    """The ε audit's plan, on stdout before any training (warnings on stderr too)."""
    print(text, flush=True)
    if "WARNING" in text:
        print(text.split("\n", 1)[1], file=sys.stderr, flush=True)


def format_report(report: dict) -> str:
    lines = [f"audit of {report['run']} ({report['privacy_mode']} privacy, {report['aggregation']} aggregation)"]
    rp = report["released_parameters"]
    lines.append(
        f"released parameters: {rp['members']} members / {rp['candidates'] - rp['members']} non-members, {rp['shadow_runs']} shadow runs"
    )
    non_members = rp["candidates"] - rp["members"]

    def tpr(m: dict, key: str, fpr: float) -> str:
        # a TPR at an FPR below 1/non-members rests on less than one false positive: not resolvable
        return f"{m[key]:.4f}" if fpr * non_members >= 1 else f"- (needs ≥ {int(round(1 / fpr))} non-members)"

    lines.append("| attack | AUC | balanced acc. | TPR@0.1%FPR | TPR@1%FPR |")
    lines.append("|---|---|---|---|---|")
    for name, m in rp["attacks"].items():
        lines.append(
            f"| {name} | {m['auc']:.4f} | {m['balanced_accuracy']:.4f} | {tpr(m, 'tpr_at_0_1pct_fpr', 0.001)} | "
            f"{tpr(m, 'tpr_at_1pct_fpr', 0.01)} |"
        )
    if "server_view" in report:
        sv = report["server_view"]
        lines.append(
            f"server view ({sv['clients']} clients): AUC plain update {sv['plain_update']['auc']:.4f} "
            f"vs {sv['secure_kind']} aggregate {sv['secure_aggregate']['auc']:.4f}"
        )
    claim = report["claimed"]["epsilon"]
    if "epsilon" in report:
        e = report["epsilon"]
        level = f" at {e['mechanism']} level" if e.get("mechanism") else ""
        lines.append(
            f"ε̂ = {e['estimate']:.3f} ({e['confidence']:.0%} confidence, one-run, {e['one_run']['canaries']} {e['canary_kind']} canaries"
            f"{level}, {e['one_run']['correct']}/{e['one_run']['guesses']} guesses right); "
            f"largest ε this m can refute: {e['ceiling']:.3f}"
        )
    lines.append(f"claimed ε = {'none (no DP)' if claim is None else f'{claim:.3f}'}; verdict: {report['verdict'].upper()}")
    return "\n".join(lines)
