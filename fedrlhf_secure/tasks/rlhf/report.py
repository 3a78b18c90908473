"""The per-round table and plots of a ``kind: rlhf`` run, from its ``metrics.jsonl`` and ``summary.json``.

    python -m fedrlhf_secure.tasks.rlhf.report RUN_DIR

prints a Markdown table (round 0 = the base model, the ``initial_policy`` baseline; then one row per
round: held-out positive rate by the independent judge, its mean P(positive), the lexicon judge's
positive rate, KL to the base model), the Spearman rank correlation between the clients' own shaped
rewards and their λ_k (personalisation), and writes ``plots/rlhf_rounds.png`` (positive rate and KL
per round, two panels with their units).

    python -m fedrlhf_secure.tasks.rlhf.report --frontier RUN_DIR... [--out DIR]

draws the reward–KL frontier per method (Gao et al. 2023, "Scaling laws for reward model
overoptimization", plot the gold reward against KL to the initial policy for the same reason): the
independent judge's held-out mean P(positive) against KL(π‖π_base), one curve per run named by its
method (on-policy DPO, offline DPO, GRPO with a reward model or the shaped reward), one point per
round, the base model at KL 0. It writes
``frontier.json`` (the numbers the plot is drawn from) and ``frontier.png`` into ``--out`` (default:
the first run's ``plots/``). The judge, not the training reward, is on the y axis: a method that
buys its own reward with KL but not the judge's score shows up as a flat curve.
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


def method_of(config: dict[str, Any]) -> str:
    """The method a run's ``config.yaml`` describes, named as in docs/rlhf.md (RLHFConfig's defaults fill gaps)."""
    from .config import RLHFConfig

    task = config.get("task") or {}
    trainer = task.get("trainer", RLHFConfig.trainer)
    if trainer == "dpo":
        return "on-policy DPO" if task.get("on_policy", RLHFConfig.on_policy) else "offline DPO"
    reward = task.get("reward", RLHFConfig.reward)
    return "GRPO (reward model)" if reward == "model" else "GRPO (shaped reward)"


def _read_run(run: Path) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    from ...errors import InputError

    files = {name: run / name for name in ("config.yaml", "metrics.jsonl", "summary.json")}
    for name, path in files.items():
        if not path.is_file():
            raise InputError(f"{path}: no such file; --frontier needs completed run directories of kind rlhf (with {name})")
    config = yaml.safe_load(files["config.yaml"].read_text()) or {}
    if (config.get("task") or {}).get("kind") != "rlhf":
        raise InputError(f"{files['config.yaml']}: task.kind must be rlhf, got {(config.get('task') or {}).get('kind')!r}")
    rows = [json.loads(line) for line in files["metrics.jsonl"].read_text().splitlines() if line.strip()]
    summary = json.loads(files["summary.json"].read_text())
    return config, rows, summary


def frontier_data(runs: list[Path]) -> dict[str, Any]:
    """The frontier's numbers: one curve per run, named by its method, one point per round (round 0 =
    the run's own base-model baseline, KL 0); ``base`` is the first run's baseline."""
    from ...errors import InputError

    curves: list[dict[str, Any]] = []
    base: dict[str, Any] | None = None
    for run in runs:
        config, rows, summary = _read_run(run)
        b = summary.get("baselines", {}).get("initial_policy")
        if not b or b.get("judge_score") is None:
            raise InputError(
                f"{run / 'summary.json'}: no initial_policy baseline with the judge's score; "
                "run with baselines: [initial_policy] on data: imdb"
            )
        points = [{"round": 0, "kl_to_base": 0.0, "judge_score": b["judge_score"], "positive_rate": b.get("positive_rate")}]
        points += [
            {
                "round": r["round"] + 1,
                "kl_to_base": r.get("kl_to_base_mean"),
                "judge_score": r.get("judge_score_mean"),
                "positive_rate": r.get("positive_rate_mean"),
            }
            for r in rows
        ]
        curves.append({"method": method_of(config), "run": str(run), "points": points})
        if base is None:
            base = {"judge_score": b["judge_score"], "positive_rate": b.get("positive_rate"), "run": str(run)}
    methods = [c["method"] for c in curves]
    for c in curves:  # two runs of one method: tell their curves apart by the run's folder name
        c["label"] = c["method"] if methods.count(c["method"]) == 1 else f"{c['method']} ({Path(c['run']).name})"
    return {
        "x": "KL(π ‖ π_base), nats per completion (Monte-Carlo, held-out prompts)",
        "y": "independent judge's mean P(positive) on held-out generations",
        "base": base,
        "curves": curves,
    }


def plot_frontier(data: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, curve in enumerate(data["curves"]):
        kl = [p["kl_to_base"] for p in curve["points"]]
        y = [p["judge_score"] for p in curve["points"]]
        ax.plot(kl, y, "o-", color=f"C{i}", label=curve["label"])
        for p in curve["points"][1:]:
            ax.annotate(str(p["round"]), (p["kl_to_base"], p["judge_score"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    base = data["base"]
    ax.plot([0], [base["judge_score"]], "k*", markersize=12, label="base model", zorder=5)
    ax.axhline(base["judge_score"], color="k", lw=0.6, ls=":")
    ax.set_xlabel("KL(π ‖ π_base) (nats / completion)")
    ax.set_ylabel("judge mean P(positive), held-out")
    ax.set_title("reward–KL frontier (numbers: round)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "frontier.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    from ...errors import FedRLHFError, exit_status

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, nargs="?", help="one run directory: its per-round table and plots/rlhf_rounds.png")
    parser.add_argument("--frontier", type=Path, nargs="+", metavar="RUN", help="run directories: the reward–KL frontier per method")
    parser.add_argument("--out", type=Path, help="where --frontier writes frontier.json and frontier.png (default: the first run's plots/)")
    args = parser.parse_args(argv)
    if (args.run is None) == (args.frontier is None):
        parser.error("give one RUN_DIR or --frontier RUN...")
    try:
        if args.frontier:
            data = frontier_data(args.frontier)
            out = args.out or args.frontier[0] / "plots"
            path = plot_frontier(data, out)
            (out / "frontier.json").write_text(json.dumps(data, indent=1))
            for c in data["curves"]:
                pts = ", ".join(f"({_fmt(p['kl_to_base'])}, {_fmt(p['judge_score'])})" for p in c["points"])
                sys.stdout.write(f"{c['label']}: (KL, judge P(positive)) per round: {pts}\n")
            sys.stdout.write(f"frontier: {path} and {out / 'frontier.json'}\n")
            return 0
        table, stats = rounds_table(args.run)
        path = plot_rounds(args.run)
    except FedRLHFError as exc:
        sys.stderr.write(f"report: error: {exc}\n")
        return exit_status(exc) or 2
    sys.stdout.write(f"{table}\n{json.dumps(stats, indent=1)}\nplot: {path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
