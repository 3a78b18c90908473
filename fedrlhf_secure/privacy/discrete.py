"""Distributed Skellam noise for the integer masking mode (Agarwal, Kairouz & Liu 2021).

Under pairwise masking the server only learns the *sum* of the clients' quantised updates, so
the noise must be added by the clients, in the integer domain, before masking. Each client adds
a symmetric Skellam share of variance μ/(m-1) per coordinate (:func:`.client_level.share_divisor`:
a participant that reads the aggregate knows its own share, so any m - 1 shares must carry μ).
Skellam noise is closed under summation, so the sum over any m' - 1 ≥ m - 1 shares not known to an
observer carries exactly ``Skellam`` noise of variance ``μ (m'-1)/(m-1) ≥ μ``: the guarantee holds
whenever at least ``m`` clients survive, and more survivors only add noise (Kairouz, Liu & Steinke 2021 make the same
argument for the distributed discrete Gaussian, whose sum is only approximately discrete Gaussian;
Skellam needs no such approximation, which is why it is used here). Integer noise also avoids the
floating-point attacks on continuous Gaussian samplers (Mironov 2012).

Sensitivity in the integer domain, under replace-one (one client's data replaced,
:data:`.accountants.RELATION`): the update is clipped to L2 norm C, then the aggregator scales it
by ``s`` and rounds each coordinate (to nearest or stochastically), which moves each coordinate by
less than 1. One quantised update has L2 norm at most ``s·C + √d``; replacing it by another moves
the integer sum by at most twice that, ``Δ2 = 2(s·C + √d)`` in L2 and ``Δ1 = √d · Δ2`` in L1
(Cauchy–Schwarz), the bounds fed to :func:`.accountants.skellam_rdp`.
"""

from __future__ import annotations

import math

import numpy as np

from .randomness import secret_numpy_rng


def integer_sensitivities(scale: float, clip_norm: float, dim: int) -> tuple[float, float]:
    """(Δ1, Δ2) of replacing one client's quantised, clipped update (see the module docstring)."""
    l2 = 2 * (scale * clip_norm + math.sqrt(dim))
    return math.sqrt(dim) * l2, l2


def skellam_share(dim: int, variance: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """One client's integer noise share: ``dim`` symmetric Skellam draws of the given variance."""
    if variance < 0:
        raise ValueError(f"variance must be >= 0, got {variance}")
    rng = rng or secret_numpy_rng()
    lam = variance / 2
    return rng.poisson(lam, dim).astype(np.int64) - rng.poisson(lam, dim).astype(np.int64)
