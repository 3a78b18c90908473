"""How much an ε audit can prove: the one-run p-value and the largest ε a number of canaries can refute.

Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1) Training Run", Theorem 3.1 with the δ
term of Thm 5.2 / Prop. 5.8. It lives in the runtime (not in :mod:`attacks.bounds`, which re-exports
it) because a run sizes its own canaries from its claim (``privacy.audit_canaries: auto``) and the
runtime never imports the attacks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def _check_counts(m: int, r: int, v: int) -> None:
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[≥ v correct out of r guesses] under (ε, δ)-DP (Steinke et al. 2023, Thm 3.1 / Prop. 5.8)."""
    _check_counts(m, r, v)
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and 0 <= delta <= 1, got {epsilon}, {delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of ε-DP randomized response
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if v == 0 or delta == 0:
        return min(1.0, beta)
    i = np.arange(1, v + 1)
    window = np.cumsum(stats.binom.pmf(v - i, r, q))  # P[v - i <= Binomial(r, q) < v]
    alpha = float(np.max(window / i))
    return min(1.0, beta + alpha * delta * 2 * m)


def one_run_epsilon(m: int, r: int, v: int, delta: float, confidence: float = 0.95, *, tol: float = 1e-6) -> float:
    """Largest ε with ``one_run_p_value(m, r, v, ε, δ) < 1 - confidence`` (0 when even ε = 0 is not rejected)."""
    _check_counts(m, r, v)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    p = 1.0 - confidence
    if one_run_p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    lo, hi = 0.0, 1.0
    while one_run_p_value(m, r, v, hi, delta) < p:
        lo, hi = hi, hi * 2
        if hi > 1e3:
            return math.inf  # e.g. δ = 0 and every guess right on a huge r: no finite ε explains it
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if one_run_p_value(m, r, v, mid, delta) < p:
            lo = mid
        else:
            hi = mid
    return lo


GRADIENT_CANARY_FRACTION = 0.45
"""The fixed guess policy of the gradient-canary audit: ``k+ = k- = ⌊0.45·m⌋`` (guess on 90% of the
canaries, abstain on the middle 10%). Fixed before any score is seen, so no Bonferroni grid is paid
for; 0.45 < ½ leaves room for the coin count to fall below m/2 (at m = 2,000 the chance that fewer
than 45% of the coins come up "in" is below 1e-5), so a perfect attack makes no forced error."""


def refutable_ceiling(m: int, delta: float, confidence: float = 0.95, fractions: Sequence[float] = (GRADIENT_CANARY_FRACTION,)) -> float:
    """The largest ε̂ an audit with ``m`` canaries can report (every guess right), i.e. the largest
    claim it can ever refute, at ``delta``, ``confidence`` and the guess grid ``fractions``
    (Bonferroni over the grid, as :func:`one_run_audit`).

    Why it matters: the one-run bound saturates (Steinke et al. 2023, Fig. 1): with r correct guesses
    the ε-DP p-value ``(e^ε/(1+e^ε))^r`` needs ``r ≳ 3e^ε``, and the ``2mδ`` term of Thm 5.2 caps the
    bound near ``log(1/(mδ))``-ish from above, so for δ = 1e-5 no m reaches much past 8.1. A claim at or
    above the ceiling cannot fail, whatever the run does."""
    grid_conf = 1.0 - (1.0 - confidence) / len(fractions)
    best = 0.0
    for f in fractions:
        k = max(1, min(m // 2, int(f * m)))
        best = max(best, one_run_epsilon(m, 2 * k, 2 * k, delta, grid_conf))
    return best


CANARY_LADDER = (500, 1000, 2000, 3000, 5000, 7500, 10_000, 15_000, 20_000, 25_000, 30_000, 40_000, 50_000)


def canaries_needed(
    epsilon: float,
    delta: float,
    confidence: float = 0.95,
    fractions: Sequence[float] = (GRADIENT_CANARY_FRACTION,),
    *,
    limit: int | None = None,
) -> int | None:
    """The smallest m on :data:`CANARY_LADDER` (at most ``limit``) whose ceiling exceeds ``epsilon``; None when none does."""
    for m in CANARY_LADDER:
        if limit is not None and m > limit:
            break
        if refutable_ceiling(m, delta, confidence, fractions) > epsilon:
            return m
    return None
