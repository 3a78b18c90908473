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

    fig, ax = plt.subplots(figsize=(5, 5))
    floor = 1.0
    for name, (scores, labels) in curves.items():
        fpr, tpr, _ = roc_curve(scores, labels)
        n_neg = int((np.asarray(labels) == 0).sum())
        floor = min(floor, 0.5 / max(n_neg, 1))
        ax.plot(np.maximum(fpr, floor), np.maximum(tpr, floor), label=f"{name} (AUC {auc(scores, labels):.3f})")
    grid = np.logspace(np.log10(floor), 0, 100)
    ax.plot(grid, grid, "k--", lw=0.8, label="chance")
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
