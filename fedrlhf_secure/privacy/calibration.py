"""Find the noise that makes a whole run meet its (ε, δ) budget.

The noise is calibrated once, for **all** planned releases of a run (every DP-SGD step of every
round, or every DP-FedAvg round), not per round: calibrating per round and reporting a per-round
ε (as Flower's Opacus example does) silently spends ``rounds × ε``.

The search brackets the noise with the accountant in the loop and narrows the bracket. It returns the upper end
of the final bracket, so the calibrated noise always meets the target (ε(noise) ≤ target) and is
within ``rtol`` of the smallest noise that does.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ..errors import InputError
from .accountants import Accountant, GaussianRelease, SkellamAccountant, SkellamRelease

MAX_NOISE = 1e6


class BudgetTooSmall(InputError):
    """No finite noise reaches the target ε (e.g. δ too small for the number of releases): the
    configured ε/δ/rounds cannot be met, a bad config (exit status 2)."""


def bisect_noise(epsilon_of: Callable[[float], float], target_epsilon: float, *, start: float = 1.0, rtol: float = 2e-3) -> float:
    """Smallest noise (to ``rtol``) with ``epsilon_of(noise) <= target_epsilon``; ε must fall with noise.

    A bracket ``[lo, hi]`` with ε(lo) > target ≥ ε(hi) is narrowed by regula falsi on
    ``log ε`` against ``log noise`` (Illinois variant, which keeps both ends moving), falling back
    to a geometric bisection step; accountant calls are the cost (PRV takes ~0.2 s each), and this
    needs about half the calls of plain bisection.
    """
    if not target_epsilon > 0:
        raise ValueError(f"target ε must be > 0, got {target_epsilon}")
    log_t = math.log(target_epsilon)

    def f(noise: float) -> float:
        eps = epsilon_of(noise)
        return math.inf if eps == math.inf else (math.log(eps) - log_t if eps > 0 else -math.inf)

    hi = start
    f_hi = f(hi)
    while f_hi > 0:
        hi *= 2
        if hi > MAX_NOISE:
            raise BudgetTooSmall(f"no noise up to {MAX_NOISE:g} reaches ε={target_epsilon}")
        f_hi = f(hi)
    lo = hi / 2
    f_lo = f(lo)
    while f_lo <= 0 and lo > 1e-6:
        hi, f_hi = lo, f_lo
        lo /= 2
        f_lo = f(lo)
    if f_lo <= 0:
        return lo
    side = 0
    while hi - lo > rtol * hi:
        x_lo, x_hi = math.log(lo), math.log(hi)
        if math.isfinite(f_lo) and math.isfinite(f_hi) and f_lo != f_hi:
            x = x_hi - f_hi * (x_hi - x_lo) / (f_hi - f_lo)
            if not x_lo < x < x_hi:
                x = (x_lo + x_hi) / 2
        else:
            x = (x_lo + x_hi) / 2
        mid = math.exp(x)
        # never stop on a sliver: keep each step at least rtol/2 inside the bracket
        mid = min(max(mid, lo + rtol * hi / 2), hi - rtol * hi / 2)
        f_mid = f(mid)
        if f_mid <= 0:
            hi, f_hi = mid, f_mid
            if side == -1:
                f_lo /= 2
            side = -1
        else:
            lo, f_lo = mid, f_mid
            if side == 1:
                f_hi /= 2
            side = 1
    return hi


def gaussian_noise_multiplier(accountant: Accountant, target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Noise multiplier σ so that ``steps`` subsampled-Gaussian releases at rate ``sample_rate`` cost ≤ ε."""
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    return bisect_noise(lambda s: accountant.epsilon([GaussianRelease(s, sample_rate, steps)], delta), target_epsilon)


def skellam_variance(target_epsilon: float, delta: float, l1: float, l2: float, steps: int) -> float:
    """Total Skellam variance μ (integer domain) so that ``steps`` releases with sensitivities ``l1``/``l2`` cost ≤ ε."""
    acc = SkellamAccountant()
    scale = l2 * l2
    return scale * bisect_noise(
        lambda v: acc.epsilon([SkellamRelease(v * scale, l1, l2, steps)], delta), target_epsilon, start=max(1.0, math.sqrt(steps))
    )
