"""Per-client evaluation numbers of the MovieLens task, shared by the federated clients and the baselines.

Counts (``correct``/``n``, ``train_correct``/``train_n``) travel with the rates so the round core can
pool clients into one held-out accuracy; ``spearman`` is the rank correlation between the model's
scores and the user's ratings (FedRLHF's personalisation metric).
"""

from __future__ import annotations

import numpy as np

from .feedback import labels


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant or n < 2."""
    if len(x) < 2:
        return float("nan")
    rx, ry = _average_ranks(np.asarray(x, dtype=np.float64)), _average_ranks(np.asarray(y, dtype=np.float64))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    if denom == 0:
        return float("nan")
    return float((rx * ry).sum() / denom)


def _average_ranks(a: np.ndarray) -> np.ndarray:
    order = np.argsort(a, kind="stable")
    sorted_a = a[order]
    ranks = np.empty(len(a), dtype=np.float64)
    starts = np.flatnonzero(np.r_[True, sorted_a[1:] != sorted_a[:-1]])
    ends = np.r_[starts[1:], len(a)]
    for s, e in zip(starts, ends, strict=False):
        ranks[order[s:e]] = (s + e - 1) / 2.0
    return ranks


def evaluate_scores(test_z: np.ndarray, test_r: np.ndarray, train_z: np.ndarray, train_r: np.ndarray) -> dict[str, float]:
    correct = int(((test_z > 0) == (labels(test_r) == 1.0)).sum())
    train_correct = int(((train_z > 0) == (labels(train_r) == 1.0)).sum())
    n, train_n = len(test_r), len(train_r)
    return {
        "correct": float(correct),
        "n": float(n),
        "accuracy": correct / n if n else float("nan"),
        "train_correct": float(train_correct),
        "train_n": float(train_n),
        "train_accuracy": train_correct / train_n if train_n else float("nan"),
        "spearman": spearman(test_z, test_r),
    }
