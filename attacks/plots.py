"""Log-log ROC curves (Carlini et al. 2022, Fig. 1): the low-FPR corner is where privacy is decided."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .metrics import auc, roc_curve


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str) -> Path:
    """``curves[name] = (scores, labels)``; one log-log ROC line per attack and the chance diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    floor, n_pos, n_neg = 1.0, 0, 0
    for name, (scores, labels) in curves.items():
        fpr, tpr, _ = roc_curve(scores, labels)
        n_neg = int((np.asarray(labels) == 0).sum())
        n_pos = int((np.asarray(labels) == 1).sum())
        floor = min(floor, 0.5 / max(n_neg, 1))
        ax.plot(np.maximum(fpr, floor), np.maximum(tpr, floor), label=f"{name} (AUC {auc(scores, labels):.3f})")
    grid = np.logspace(np.log10(floor), 0, 100)
    ax.plot(grid, grid, "k--", lw=0.8, label="chance")
    # the smallest FPR these non-members can resolve: one false positive among n_neg
    resolvable = 1.0 / max(n_neg, 1)
    ax.axvline(resolvable, color="grey", linestyle=":", lw=1, label=f"FPR floor 1/{n_neg} non-members")
    ax.text(0.02, 0.98, f"{n_pos} members, {n_neg} non-members", transform=ax.transAxes, va="top", fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
