"""Plots a person would rather look at than JSON: accuracy (and ε) per round, per-client spread."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(
    run_dir: Path,
    history: Sequence[Mapping[str, Any]],
    final_clients: Mapping[int, Mapping[str, float]],
    plot_metrics: Sequence[str] = ("heldout_accuracy", "train_accuracy"),
) -> list[Path]:
    plt = _pyplot()
    out_dir = Path(run_dir) / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if history:
        rounds = [h["round"] + 1 for h in history]
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for key in plot_metrics:
            vals = [h.get(key) for h in history]
            if any(isinstance(v, (int, float)) for v in vals):
                ax.plot(rounds, [np.nan if v is None else v for v in vals], marker="o", label=key.replace("_", " "))
        ax.set_xlabel("round")
        ax.set_ylabel("metric")
        ax.grid(alpha=0.3)
        eps = [h.get("privacy_epsilon_spent_max") for h in history]
        handles, labels = ax.get_legend_handles_labels()
        if any(isinstance(e, (int, float)) for e in eps):
            ax2 = ax.twinx()
            ax2.plot(
                rounds,
                [np.nan if e is None else e for e in eps],
                color="tab:red",
                linestyle="--",
                marker="x",
                label="ε spent (max over clients)",
            )
            ax2.set_ylabel("ε")
            h2, l2 = ax2.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        ax.legend(handles, labels, loc="lower right")
        ax.set_title("Per-round metrics")
        fig.tight_layout()
        p = out_dir / "accuracy_per_round.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(p)
    written += _per_client_rewards(out_dir, history)
    accs = np.asarray([m["accuracy"] for m in final_clients.values() if np.isfinite(m.get("accuracy", np.nan))])
    if accs.size:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        ax.hist(accs, bins=30, color="tab:blue", alpha=0.8)
        ax.axvline(accs.mean(), color="k", linestyle="--", label=f"mean {accs.mean():.3f}")
        ax.set_xlabel("held-out accuracy of one client")
        ax.set_ylabel("clients")
        ax.set_title(f"Per-client accuracy after the last round (n={accs.size})")
        ax.legend()
        fig.tight_layout()
        p = out_dir / "client_accuracy.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(p)
    return written


def _per_client_rewards(out_dir: Path, history: Sequence[Mapping[str, Any]]) -> list[Path]:
    """Each client's own shaped reward per round (personalisation: one line per client)."""
    keys = sorted(k for k in (history[-1] if history else {}) if k.startswith("shaped_reward_client") and k.endswith("_mean"))
    if not keys:
        return []
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    rounds = [h["round"] + 1 for h in history]
    for key in keys:
        ax.plot(rounds, [h.get(key, np.nan) for h in history], marker="o", label=key[len("shaped_reward_") : -len("_mean")])
    ax.set_xlabel("round")
    ax.set_ylabel("the client's own shaped reward")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Personalised reward per client")
    fig.tight_layout()
    p = out_dir / "client_rewards.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return [p]
