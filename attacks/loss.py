"""The LOSS / threshold attack (Yeom et al. 2018, "Privacy Risk in Machine Learning", §3.2).

A model fits its training records better than unseen ones, so a record whose loss is low is
guessed to be a member. The score is the negated loss; for our binary policy the loss of the
true label is ``softplus(-z)`` with ``z`` the logit of the true label
(:meth:`MovieLensTask.record_scores`), a decreasing function of ``z``, so ``z`` itself ranks
records identically and is what we return. It needs no shadow models and is the weakest
baseline: it cannot tell an easy non-member from a memorised member.
"""

from __future__ import annotations

import numpy as np


def loss_scores(target_logits: np.ndarray) -> np.ndarray:
    """Membership score = -loss = the true-label logit (monotone in -softplus(-z))."""
    z = np.asarray(target_logits, dtype=np.float64)
    return -np.logaddexp(0.0, -z)
