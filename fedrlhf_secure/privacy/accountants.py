"""Privacy accountants: from a history of DP releases to the (ε, δ) they add up to.

One job each:

* :class:`GaussianAccountant` — the Poisson-subsampled Gaussian mechanism (DP-SGD steps and
  DP-FedAvg rounds), composed with Opacus' accountants: ``rdp`` (Rényi DP, Mironov 2017; Mironov,
  Talwar & Zhang 2019) or ``prv`` (privacy random variables, Gopi, Lee & Wutschitz 2021, which is
  tighter). Opacus is the vetted implementation; we only feed it a history.
* :class:`SkellamAccountant` — the Skellam mechanism used for distributed integer noise under
  secure aggregation (Agarwal, Kairouz & Liu 2021, Theorem 3.5), composed in RDP and converted
  to (ε, δ) with the conversion of Canonne, Kamath & Steinke 2020 (Prop. 12).

A history is a sequence of ``(noise, sample_rate, steps)`` triples; equal consecutive triples are
merged, and results are cached on the merged history, because the engine asks for the same ε
many times (one accountant call per client per round).
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

ACCOUNTANTS = ("prv", "rdp")


@dataclass(frozen=True)
class GaussianRelease:
    """``steps`` compositions of the Gaussian mechanism with noise std ``noise_multiplier × sensitivity``
    on a Poisson sample of rate ``sample_rate``."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def merge(history: Iterable[GaussianRelease]) -> tuple[GaussianRelease, ...]:
    """Merge consecutive releases with the same noise and sampling rate (composition is additive in steps)."""
    out: list[GaussianRelease] = []
    for h in history:
        if h.steps <= 0:
            continue
        if out and out[-1].noise_multiplier == h.noise_multiplier and out[-1].sample_rate == h.sample_rate:
            out[-1] = GaussianRelease(h.noise_multiplier, h.sample_rate, out[-1].steps + h.steps)
        else:
            out.append(h)
    return tuple(out)


class Accountant(ABC):
    name: str

    @abstractmethod
    def epsilon(self, history: Sequence[GaussianRelease], delta: float) -> float:
        """ε of the composition of ``history`` at ``delta`` (0 for an empty history)."""


class GaussianAccountant(Accountant):
    """Subsampled Gaussian composition through Opacus' ``rdp`` or ``prv`` accountant."""

    def __init__(self, name: str) -> None:
        if name not in ACCOUNTANTS:
            raise ValueError(f"privacy.accountant must be one of {', '.join(ACCOUNTANTS)}, got {name!r}")
        self.name = name

    def epsilon(self, history: Sequence[GaussianRelease], delta: float) -> float:
        return _opacus_epsilon(self.name, merge(history), float(delta))


@lru_cache(maxsize=4096)
def _opacus_epsilon(name: str, history: tuple[GaussianRelease, ...], delta: float) -> float:
    if not history:
        return 0.0
    if any(h.noise_multiplier <= 0 for h in history):
        return math.inf
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = PRVAccountant() if name == "prv" else RDPAccountant()
    acc.history = [(h.noise_multiplier, h.sample_rate, h.steps) for h in history]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Optimal order.*")
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        return float(acc.get_epsilon(delta=delta))


# ---------------------------------------------------------------------------------------------
# Skellam (distributed integer noise)
# ---------------------------------------------------------------------------------------------

_ORDERS = tuple(range(2, 257))


@dataclass(frozen=True)
class SkellamRelease:
    """``steps`` compositions of the Skellam mechanism: integer vector with L1/L2 sensitivity
    ``l1``/``l2`` plus symmetric Skellam noise of total variance ``variance`` (no subsampling
    amplification is claimed)."""

    variance: float
    l1: float
    l2: float
    steps: int


def skellam_rdp(order: int, variance: float, l1: float, l2: float) -> float:
    """RDP of the Skellam mechanism at integer ``order`` (Agarwal, Kairouz & Liu 2021, Thm 3.5)::

        ε(α) ≤ α Δ2² / (2μ) + min( ((2α − 1) Δ2² + 6 Δ1) / (4 μ²),  3 Δ1 / (2μ) )

    with μ the variance of the noise (a difference of two Poisson(μ/2)).
    """
    mu = variance
    return order * l2 * l2 / (2 * mu) + min(((2 * order - 1) * l2 * l2 + 6 * l1) / (4 * mu * mu), 3 * l1 / (2 * mu))


def rdp_to_epsilon(orders: Sequence[int], rdp: Sequence[float], delta: float) -> float:
    """(ε, δ) from RDP curves (Canonne, Kamath & Steinke 2020, Prop. 12; as in Opacus)."""
    best = math.inf
    for a, r in zip(orders, rdp, strict=False):
        eps = r + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1)
        best = min(best, eps)
    return max(best, 0.0)


class SkellamAccountant:
    """RDP accountant for the Skellam mechanism (no amplification by client sampling is claimed)."""

    name = "skellam-rdp"

    def epsilon(self, history: Sequence[SkellamRelease], delta: float) -> float:
        if not history:
            return 0.0
        if any(h.variance <= 0 for h in history):
            return math.inf
        rdp = [sum(h.steps * skellam_rdp(a, h.variance, h.l1, h.l2) for h in history) for a in _ORDERS]
        return rdp_to_epsilon(_ORDERS, rdp, delta)
