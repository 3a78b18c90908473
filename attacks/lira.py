"""LiRA, the Likelihood Ratio Attack (Carlini et al. 2022, "Membership Inference Attacks From First
Principles", Algorithm 1; online and offline variants, §IV-C/§VI-A).

For each candidate record the attacker trains shadow models on random halves of the candidate
pool, so the record is IN about half of them and OUT of the rest. The record's *logit-scaled
confidence* ``φ = log(p / (1 - p))`` (p = the model's probability of the true label; their eq. 4)
is close to Gaussian over training randomness, separately for IN and OUT models. For our binary
policy ``p = σ(z)`` with ``z`` the true-label logit, so ``φ = z`` exactly.

* **online**: fit per-example Gaussians ``N(μ_in, σ_in²)`` and ``N(μ_out, σ_out²)`` and score the
  target's ``φ`` by the log likelihood ratio ``log N(φ; μ_in, σ_in²) - log N(φ; μ_out, σ_out²)``;
* **offline**: only OUT models (cheaper: they can be trained before the target exists); the
  score is the one-sided ``log P[Z ≤ φ]``, ``Z ~ N(μ_out, σ_out²)``: how far above the OUT
  distribution the target's confidence lies.

With few shadow models (16 gives ~8 IN and ~8 OUT per record) per-example variances are noisy;
Carlini et al. recommend a *global* variance then (§VI-A, "fixed variance"), available here as
``fixed_variance=True``. Per-example variances get a floor so that records whose OUT confidence
never moves (e.g. an item nobody else rated: its embedding row stays at its public initial value)
give a large but finite ratio.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

VARIANCE_FLOOR = 1e-6


def _masked_stats(values: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = mask.sum(axis=0)
    mean = (values * mask).sum(axis=0) / np.maximum(n, 1)
    var = (((values - mean) ** 2) * mask).sum(axis=0) / np.maximum(n - 1, 1)
    return mean, var, n


def _variances(var: np.ndarray, n: np.ndarray, fixed: bool) -> np.ndarray:
    usable = n >= 2
    global_var = float(np.median(var[usable])) if usable.any() else 1.0
    global_var = max(global_var, VARIANCE_FLOOR)
    if fixed:
        return np.full_like(var, global_var)
    return np.where(usable, np.maximum(var, VARIANCE_FLOOR), global_var)


def _validate(target: np.ndarray, shadow: np.ndarray, shadow_in: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z = np.asarray(target, dtype=np.float64)
    sh = np.asarray(shadow, dtype=np.float64)
    inc = np.asarray(shadow_in, dtype=bool)
    if sh.ndim != 2 or sh.shape != inc.shape or sh.shape[1:] != z.shape:
        raise ValueError(f"shadow logits {sh.shape}, inclusion {inc.shape} and target {z.shape} do not match")
    return z, sh, inc


def lira_online(target_logits: np.ndarray, shadow_logits: np.ndarray, shadow_in: np.ndarray, *, fixed_variance: bool = False) -> np.ndarray:
    """Per-record log likelihood ratio IN vs OUT (records lacking IN or OUT shadows fall back to
    the mean of the other side shifted by the median IN-OUT gap)."""
    z, sh, inc = _validate(target_logits, shadow_logits, shadow_in)
    mu_in, var_in, n_in = _masked_stats(sh, inc)
    mu_out, var_out, n_out = _masked_stats(sh, ~inc)
    both = (n_in > 0) & (n_out > 0)
    gap = float(np.median(mu_in[both] - mu_out[both])) if both.any() else 0.0
    mu_in = np.where(n_in > 0, mu_in, mu_out + gap)
    mu_out = np.where(n_out > 0, mu_out, mu_in - gap)
    s_in = np.sqrt(_variances(var_in, n_in, fixed_variance))
    s_out = np.sqrt(_variances(var_out, n_out, fixed_variance))
    return stats.norm.logpdf(z, mu_in, s_in) - stats.norm.logpdf(z, mu_out, s_out)


def lira_offline(
    target_logits: np.ndarray, shadow_logits: np.ndarray, shadow_in: np.ndarray, *, fixed_variance: bool = False
) -> np.ndarray:
    """``log P[Z ≤ φ_target]`` under the record's OUT Gaussian (records with no OUT shadow use the
    pooled OUT mean and variance)."""
    z, sh, inc = _validate(target_logits, shadow_logits, shadow_in)
    mu_out, var_out, n_out = _masked_stats(sh, ~inc)
    mu_out = np.where(n_out > 0, mu_out, float(np.mean(sh[~inc])) if (~inc).any() else 0.0)
    s_out = np.sqrt(_variances(var_out, n_out, fixed_variance))
    return stats.norm.logcdf(z, mu_out, s_out)
