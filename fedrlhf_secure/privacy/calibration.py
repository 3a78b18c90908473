"""Find the noise that makes a whole run meet its (ε, δ) budget.

The noise is calibrated once, for **all** planned releases of a run (every DP-SGD step of every
round, or every DP-FedAvg round), not per round: calibrating per round and reporting a per-round
ε (as Flower's Opacus example does) silently spends ``rounds × ε``.

The search is a bisection on the noise with the accountant in the loop. It returns the upper end
of the final bracket, so the calibrated noise always meets the target (ε(noise) ≤ target) and is
within ``rtol`` of the smallest noise that does.
"""

from __future__ import annotations

import math
from typing import Callable

from .accountants import Accountant, GaussianRelease, SkellamAccountant, SkellamRelease

MAX_NOISE = 1e6


class BudgetTooSmall(ValueError):
    """No finite noise reaches the target ε (e.g. δ too small for the number of releases)."""


def bisect_noise(epsilon_of: Callable[[float], float], target_epsilon: float, *, start: float = 1.0, rtol: float = 2e-3) -> float:
    """Smallest noise (to ``rtol``) with ``epsilon_of(noise) <= target_epsilon``; ε must fall with noise."""
    if not target_epsilon > 0:
        raise ValueError(f"target ε must be > 0, got {target_epsilon}")
    hi = start
    while epsilon_of(hi) > target_epsilon:
        hi *= 2
        if hi > MAX_NOISE:
            raise BudgetTooSmall(f"no noise up to {MAX_NOISE:g} reaches ε={target_epsilon}")
    lo = hi / 2
    while lo > 1e-6 and epsilon_of(lo) <= target_epsilon:
        hi, lo = lo, lo / 2
    while hi - lo > rtol * hi:
        mid = (lo + hi) / 2
        if epsilon_of(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


def gaussian_noise_multiplier(
    accountant: Accountant, target_epsilon: float, delta: float, sample_rate: float, steps: int
) -> float:
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
