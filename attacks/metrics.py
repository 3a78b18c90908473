"""Membership-inference metrics: ROC, AUC, TPR at low FPR, balanced accuracy.

Convention everywhere in :mod:`attacks`: a *higher* score means "more likely a member", and
``labels`` is 1 for members, 0 for non-members.

Why TPR at low FPR: Carlini et al. (2022, "Membership Inference Attacks From First Principles",
§III) argue that average-case metrics (AUC, balanced accuracy) hide whether an attack can
*confidently* identify even a few members, which is what privacy is about; they report TPR at
0.1% and 1% FPR on log-log ROC curves, and so do we (:mod:`attacks.plots`).

Balanced accuracy needs a threshold. Choosing the threshold that maximises accuracy on the very
scores it is then evaluated on is optimistically biased (the maximum over thresholds of a noisy
curve), so :func:`balanced_accuracy_heldout` picks the threshold on one half of the candidates and
evaluates it on the other half (and vice versa), never on the scores that chose it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores has {s.size} entries but labels has {y.size}")
    if not np.all(np.isin(y, (0, 1))):
        raise ValueError("labels must be 0 (non-member) or 1 (member)")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise ValueError("need at least one member and one non-member")
    return s, y


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)``: predicting "member" when ``score >= threshold``.

    Starts at (0, 0) with threshold +inf and has one point per distinct score (ties move together,
    so no point depends on the order of tied scores)."""
    s, y = _check(scores, labels)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    distinct = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    tp = np.cumsum(y)[distinct]
    fp = np.cumsum(~y)[distinct]
    tpr = np.r_[0.0, tp / y.sum()]
    fpr = np.r_[0.0, fp / (~y).sum()]
    return fpr, tpr, np.r_[np.inf, s[distinct]]


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a random member > that of a random non-member) + ½ P(tie)."""
    fpr, tpr, _ = roc_curve(scores, labels)
    return float(np.trapezoid(tpr, fpr))


def tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, max_fpr: float) -> float:
    """The largest TPR reachable by a threshold whose FPR is at most ``max_fpr`` (no interpolation:
    a threshold must exist that achieves it). With ``n`` non-members, FPR below ``1/n`` can only be
    0, so quote this with the number of non-members (see :class:`AttackMetrics`)."""
    fpr, tpr, _ = roc_curve(scores, labels)
    ok = fpr <= max_fpr + 1e-12
    return float(tpr[ok].max())


def _best_threshold(s: np.ndarray, y: np.ndarray) -> float:
    fpr, tpr, thr = roc_curve(s, y)
    bal = 0.5 * (tpr + 1.0 - fpr)
    return float(thr[int(np.argmax(bal))])


def balanced_accuracy_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    s, y = _check(scores, labels)
    pred = s >= threshold
    return float(0.5 * (pred[y].mean() + (~pred[~y]).mean()))


def balanced_accuracy_heldout(scores: np.ndarray, labels: np.ndarray, seed: int = 0) -> float:
    """Two-fold balanced accuracy: threshold chosen on one random half (stratified by label),
    evaluated on the other, averaged over both directions."""
    s, y = _check(scores, labels)
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(s), dtype=bool)
    for cls in (True, False):
        idx = np.flatnonzero(y == cls)
        fold[rng.permutation(idx)[: len(idx) // 2]] = True
    accs = []
    for a, b in ((fold, ~fold), (~fold, fold)):
        if y[a].all() or not y[a].any() or y[b].all() or not y[b].any():
            continue
        accs.append(balanced_accuracy_at(s[b], y[b], _best_threshold(s[a], y[a])))
    if not accs:
        raise ValueError("too few members or non-members to hold out a threshold-selection half")
    return float(np.mean(accs))


@dataclass(frozen=True)
class AttackMetrics:
    auc: float
    balanced_accuracy: float
    tpr_at_0_1pct_fpr: float
    tpr_at_1pct_fpr: float
    members: int
    non_members: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def summarize(scores: np.ndarray, labels: np.ndarray, seed: int = 0) -> AttackMetrics:
    s, y = _check(scores, labels)
    return AttackMetrics(
        auc=auc(s, y),
        balanced_accuracy=balanced_accuracy_heldout(s, y, seed),
        tpr_at_0_1pct_fpr=tpr_at_fpr(s, y, 0.001),
        tpr_at_1pct_fpr=tpr_at_fpr(s, y, 0.01),
        members=int(y.sum()),
        non_members=int((~y).sum()),
    )
