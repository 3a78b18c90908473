"""The per-round table and plots of a ``kind: rlhf`` run, from its ``metrics.jsonl`` and ``summary.json``.

    python -m fedrlhf_secure.tasks.rlhf.report RUN_DIR

prints a Markdown table (round 0 = the base model, the ``initial_policy`` baseline; then one row per
round: held-out positive rate by the independent judge, its mean P(positive), the lexicon judge's
positive rate, KL to the base model), the Spearman rank correlation between the clients' own shaped
rewards and their λ_k (personalisation), and writes ``plots/rlhf_rounds.png`` (positive rate and KL
per round, two panels with their units).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

logger = logging.getLogger(__name__)


def _fmt(v: Any, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}f}"


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's ρ (average ranks for ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def rounds_table(run: Path) -> tuple[str, dict[str, Any]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    base = summary.get("baselines", {}).get("initial_policy", {})
    lines = [
        "| round | positive rate (judge) | judge P(positive) | positive rate (lexicon) | KL to base (nats/sequence) |",
        "|---|---|---|---|---|",
    ]
    if base:
        cells = [_fmt(base.get(k)) for k in ("positive_rate", "judge_score", "lexicon_positive_rate")]
        lines.append(f"| base | {' | '.join(cells)} | 0 |")
    for r in rows:
        lines.append(
            f"| {r['round'] + 1} | {_fmt(r.get('positive_rate_mean'))} | {_fmt(r.get('judge_score_mean'))} | "
            f"{_fmt(r.get('lexicon_positive_rate_mean'))} | {_fmt(r.get('kl_to_base_mean'))} |"
        )
    out: dict[str, Any] = {"rounds": len(rows)}
    if rows and base.get("positive_rate") is not None and rows[-1].get("positive_rate_mean") is not None:
        out["positive_rate_gain_points"] = 100 * (rows[-1]["positive_rate_mean"] - base["positive_rate"])
    config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    lambdas = (config.get("task") or {}).get("lambdas")
    if rows and lambdas:
        k = [c for c in range(len(lambdas)) if rows[-1].get(f"shaped_reward_client{c}_mean") is not None]
        if len(k) >= 2:
            own = np.asarray([rows[-1][f"shaped_reward_client{c}_mean"] for c in k])
            lam = np.asarray([lambdas[c % len(lambdas)] for c in k])
            out["own_reward_by_client"] = own.tolist()
            out["spearman_own_reward_vs_lambda"] = spearman(own, lam)
    return "\n".join(lines), out


def plot_rounds(run: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    base = summary.get("baselines", {}).get("initial_policy", {})
    x = [0] + [r["round"] + 1 for r in rows]
    pos = [base.get("positive_rate", np.nan)] + [r.get("positive_rate_mean", np.nan) for r in rows]
    lex = [base.get("lexicon_positive_rate", np.nan)] + [r.get("lexicon_positive_rate_mean", np.nan) for r in rows]
    kl = [0.0] + [r.get("kl_to_base_mean", np.nan) for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.plot(x, [100 * p for p in pos], "o-", label="independent judge (TF-IDF + LR)")
    a.plot(x, [100 * p for p in lex], "s--", label="lexicon judge")
    a.set_xlabel("round (0 = base model)")
    a.set_ylabel("held-out positive rate (%)")
    a.legend(fontsize=8)
    b.plot(x, kl, "o-", color="C3")
    b.set_xlabel("round (0 = base model)")
    b.set_ylabel("KL(π ‖ π_base) (nats / sequence)")
    from matplotlib.ticker import MaxNLocator

    for ax in (a, b):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    out = run / "plots" / "rlhf_rounds.png"
    out.parent.mkdir(exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    args = parser.parse_args(argv)
    table, stats = rounds_table(args.run)
    path = plot_rounds(args.run)
    sys.stdout.write(f"{table}\n{json.dumps(stats, indent=1)}\nplot: {path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
