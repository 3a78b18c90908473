"""The reference-model attack (difficulty calibration; Watson et al. 2022, "On the Importance of
Difficulty Calibration in Membership Inference Attacks"; Carlini et al. 2022 §IV-B).

Some records are easy (every model predicts them well) and some hard; the raw loss confuses
"easy" with "member". Subtracting the record's mean score under reference models that did *not*
train on it removes that per-record difficulty: the score is how much better the target does on
the record than models that never saw it.
"""

from __future__ import annotations

import numpy as np


def reference_scores(target_logits: np.ndarray, shadow_logits: np.ndarray, shadow_in: np.ndarray) -> np.ndarray:
    """``z_target - mean_{OUT references} z`` per record (records with no OUT reference use all references)."""
    z = np.asarray(target_logits, dtype=np.float64)
    sh = np.asarray(shadow_logits, dtype=np.float64)
    out = ~np.asarray(shadow_in, dtype=bool)
    if sh.shape != out.shape or sh.shape[1:] != z.shape:
        raise ValueError(f"shadow logits {sh.shape}, inclusion {out.shape} and target {z.shape} do not match")
    n_out = out.sum(axis=0)
    mean_out = np.where(n_out > 0, (sh * out).sum(axis=0) / np.maximum(n_out, 1), sh.mean(axis=0))
    return z - mean_out
