"""ROC metrics against independent computations (pairwise counting, scikit-learn)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from attacks import metrics


def pairwise_auc(s, y):
    pos, neg = s[y == 1], s[y == 0]
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3), st.integers(0, 1)), min_size=2, max_size=60))
def test_auc_counts_pairs_and_half_ties(pairs):
    s = np.array([p[0] for p in pairs], dtype=float)
    y = np.array([p[1] for p in pairs])
    if y.all() or not y.any():
        return
    assert metrics.auc(s, y) == pytest.approx(pairwise_auc(s, y))
    assert metrics.auc(s, y) == pytest.approx(roc_auc_score(y, s))


def test_tpr_at_fpr_on_a_hand_example():
    # 10 non-members, 4 members; members rank 1st, 2nd, 5th and 14th.
    s = np.array([14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1], dtype=float)
    y = np.array([1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1])
    assert metrics.tpr_at_fpr(s, y, 0.0) == 0.5
    assert metrics.tpr_at_fpr(s, y, 0.1) == 0.5
    assert metrics.tpr_at_fpr(s, y, 0.2) == 0.75
    assert metrics.tpr_at_fpr(s, y, 1.0) == 1.0


def test_held_out_balanced_accuracy_is_not_fooled_by_noise():
    rng = np.random.default_rng(0)
    y = (rng.random(4000) < 0.5).astype(int)
    assert abs(metrics.balanced_accuracy_heldout(rng.normal(size=4000), y) - 0.5) < 0.03
    assert metrics.balanced_accuracy_heldout(y + rng.normal(0, 0.01, 4000), y) > 0.999


def test_summary_reports_counts_and_rejects_one_class():
    m = metrics.summarize(np.arange(6.0), np.array([0, 0, 0, 1, 1, 1]))
    assert (m.auc, m.members, m.non_members, m.tpr_at_1pct_fpr) == (1.0, 3, 3, 1.0)
    with pytest.raises(ValueError, match="at least one member and one non-member"):
        metrics.summarize(np.arange(3.0), np.ones(3))
