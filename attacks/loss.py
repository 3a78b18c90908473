"""The LOSS / threshold attack (Yeom et al. 2018, "Privacy Risk in Machine Learning", §3.2).

A model fits its training records better than unseen ones, so a record whose loss is low is
guessed to be a member. The score is the negated loss. A task's
:meth:`~fedrlhf_secure.tasks.auditable.AuditableTask.record_scores` gives the logit-scaled
confidence ``z = log(p / (1 - p))`` of the model on each record (``p`` its probability of the
record's truth: the true label's for a binary classifier), so the loss is
``-log p = softplus(-z)``, a decreasing function of ``z``; ``z`` itself would rank records
identically. It needs no shadow models and is the weakest
baseline: it cannot tell an easy non-member from a memorised member.
"""

from __future__ import annotations

import numpy as np


def loss_scores(target_logits: np.ndarray) -> np.ndarray:
    """Membership score = -loss = the true-label logit (monotone in -softplus(-z))."""
    z = np.asarray(target_logits, dtype=np.float64)
    return -np.logaddexp(0.0, -z)
