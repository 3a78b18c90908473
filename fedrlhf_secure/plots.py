"""Plots a person would rather look at than JSON.

``plots/metrics_per_round.png``: one panel per unit (a rate and a KL in nats never share an axis),
rounds on an integer, 0-based axis matching ``metrics.jsonl``, the run's baselines (centralized,
local-only, majority class, the initial policy...) as horizontal lines in their metric's colour,
and, for a DP run, a panel of ε spent per round with the budget as a line.
``plots/client_accuracy.png``: the spread of the clients' own held-out accuracy after the last
round, integer counts, saying how many of the clients had held-out ratings at all.
``plots/client_rewards.png``: each client's own shaped reward per round (personalisation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .tasks.base import Metric


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _values(history: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    return [float(v) if isinstance(v := h.get(key), (int, float)) else np.nan for h in history]


def _integer_rounds(ax, rounds: Sequence[int]) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(min(rounds) - 0.3, max(rounds) + 0.3)
    ax.set_xlabel("round (0-based, as in metrics.jsonl)")


def plot_run(
    run_dir: Path,
    history: Sequence[Mapping[str, Any]],
    final_clients: Mapping[int, Mapping[str, float]],
    metrics: Sequence[Metric],
    *,
    baselines: Mapping[str, Mapping[str, Any]] | None = None,
    epsilon_budget: float | None = None,
    num_clients: int | None = None,
) -> list[Path]:
    out_dir = Path(run_dir) / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if history:
        written.append(_per_round(out_dir, history, metrics, baselines or {}, epsilon_budget))
    written += _per_client_rewards(out_dir, history)
    hist = _client_accuracy(out_dir, final_clients, num_clients)
    if hist is not None:
        written.append(hist)
    return written


def _per_round(
    out_dir: Path,
    history: Sequence[Mapping[str, Any]],
    metrics: Sequence[Metric],
    baselines: Mapping[str, Mapping[str, Any]],
    epsilon_budget: float | None,
) -> Path:
    plt = _pyplot()
    rounds = [int(h["round"]) for h in history]
    shown = [m for m in metrics if np.isfinite(_values(history, m.key)).any()]
    units = list(dict.fromkeys(m.unit for m in shown))
    eps = _values(history, "privacy_epsilon_spent_max")
    with_eps = bool(np.isfinite(eps).any())
    panels = len(units) + int(with_eps)
    fig, axes = plt.subplots(max(panels, 1), 1, figsize=(7, 2.8 * max(panels, 1) + 0.6), sharex=True, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["--", ":", "-.", (0, (5, 1, 1, 1))]
    for ax, unit in zip(axes[:, 0], units, strict=False):
        for i, m in enumerate(x for x in shown if x.unit == unit):
            colour = colours[i % len(colours)]
            ax.plot(rounds, _values(history, m.key), marker="o", color=colour, label=f"federated: {m.label}")
            for j, (name, res) in enumerate(baselines.items()):
                value = res.get(m.key)
                if isinstance(value, (int, float)) and np.isfinite(value):
                    ax.axhline(value, color=colour, linestyle=styles[j % len(styles)], linewidth=1.2, label=f"{name}: {value:.3f}")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    if with_eps:
        ax = axes[len(units), 0]
        ax.plot(rounds, eps, marker="x", color="tab:red", label="ε spent (max over clients)")
        if epsilon_budget is not None:
            ax.axhline(epsilon_budget, color="k", linestyle="--", linewidth=1.2, label=f"budget ε = {epsilon_budget:g}")
        ax.set_ylabel("ε (privacy loss)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    _integer_rounds(axes[-1, 0], rounds)
    axes[0, 0].set_title("Per-round metrics of the released global model")
    fig.tight_layout()
    p = out_dir / "metrics_per_round.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p


def _client_accuracy(out_dir: Path, final_clients: Mapping[int, Mapping[str, float]], num_clients: int | None) -> Path | None:
    accs = np.asarray(
        [v for m in final_clients.values() if isinstance(v := m.get("accuracy"), (int, float)) and np.isfinite(v)], dtype=np.float64
    )
    if not accs.size:
        return None
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.hist(accs, bins=min(30, max(5, accs.size // 3)), color="tab:blue", alpha=0.8)
    ax.axvline(accs.mean(), color="k", linestyle="--", label=f"mean {accs.mean():.3f}")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("held-out accuracy of one client (fraction of its held-out ratings)")
    ax.set_ylabel("clients (count)")
    total = num_clients if num_clients is not None else len(final_clients)
    ax.set_title(f"Per-client accuracy after the last round\n{accs.size} of {total} clients have held-out ratings")
    ax.legend()
    fig.tight_layout()
    p = out_dir / "client_accuracy.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p


def _per_client_rewards(out_dir: Path, history: Sequence[Mapping[str, Any]]) -> list[Path]:
    """Each client's own shaped reward per round (personalisation: one line per client)."""
    keys = sorted(k for k in (history[-1] if history else {}) if k.startswith("shaped_reward_client") and k.endswith("_mean"))
    if not keys:
        return []
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    rounds = [int(h["round"]) for h in history]
    for key in keys:
        ax.plot(rounds, _values(history, key), marker="o", label="client " + key[len("shaped_reward_client") : -len("_mean")])
    ax.set_ylabel("the client's own shaped reward R0 + λ·H")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _integer_rounds(ax, rounds)
    ax.set_title("Personalised reward per client")
    fig.tight_layout()
    p = out_dir / "client_rewards.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return [p]
