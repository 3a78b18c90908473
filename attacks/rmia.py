"""RMIA, the Robust Membership Inference Attack (Zarifzadeh, Liu, Shokri & Tople 2024, "Low-Cost
High-Power Membership Inference Attacks", §3, eqs. 3-5).

The score of a record ``x`` compares its likelihood ratio against those of population records
``z``: ``LR(x, z) = [Pr(x|θ) / Pr(x)] / [Pr(z|θ) / Pr(z)]`` where ``Pr(·|θ)`` is the target's
probability of the true label and ``Pr(·)`` its average over reference models. The score is the
fraction of population records ``z`` that ``x`` dominates by a factor ``γ``:
``score(x) = P_z[LR(x, z) ≥ γ]``.

* **online**: ``Pr(x)`` averages IN and OUT reference models;
* **offline**: only OUT references, and ``Pr(x) = ½((1 + a) Pr_OUT(x) + (1 - a))`` linearly
  approximates the missing IN half (their Appendix B.2.2; ``a`` is tuned on reference models,
  we default to their typical 0.3).
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit


def _prob(logits: np.ndarray) -> np.ndarray:
    return expit(np.asarray(logits, dtype=np.float64))


def rmia_scores(
    target_logits: np.ndarray,
    shadow_logits: np.ndarray,
    shadow_in: np.ndarray,
    population: np.ndarray,
    *,
    online: bool = True,
    gamma: float = 1.0,
    offline_a: float = 0.3,
) -> np.ndarray:
    """RMIA score of every candidate; ``population`` indexes the candidates used as the ``z`` samples
    (each candidate's own comparison excludes itself only through the ``≥ γ`` tie rule, which
    counts ``z = x`` as dominated at ``γ = 1``)."""
    p_target = _prob(target_logits)
    sh = _prob(shadow_logits)
    inc = np.asarray(shadow_in, dtype=bool)
    if sh.ndim != 2 or sh.shape != inc.shape or sh.shape[1:] != p_target.shape:
        raise ValueError(f"shadow logits {sh.shape}, inclusion {inc.shape} and target {p_target.shape} do not match")
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    if online:
        p_ref = sh.mean(axis=0)
    else:
        out = ~inc
        n_out = out.sum(axis=0)
        p_out = np.where(n_out > 0, (sh * out).sum(axis=0) / np.maximum(n_out, 1), sh.mean(axis=0))
        p_ref = 0.5 * ((1.0 + offline_a) * p_out + (1.0 - offline_a))
    ratio = p_target / np.maximum(p_ref, 1e-30)
    pop = np.sort(ratio[np.asarray(population)])
    # P_z[ratio(x) / ratio(z) >= γ] = P_z[ratio(z) <= ratio(x) / γ]
    return np.searchsorted(pop, ratio / gamma, side="right") / len(pop)
