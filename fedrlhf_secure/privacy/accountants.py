"""Privacy accountants: from a history of DP releases to the (ε, δ) they add up to.

**The neighbouring relation is replace-one** (:data:`RELATION`): two data sets are neighbours when
one record (record level: one rating) or one client's whole data (client level) is replaced by
another, their sizes equal. That is the relation the deployed system can honour: each client's
record count leaves it (FedAvg weights, DP-SGD step counts and sample rates are functions of n),
and which clients take part is visible to the server, and an exact count voids add/remove-one DP
(the two neighbours' outputs would be told apart by n alone). Every ε this package prints, stores
in a ledger and enforces is a replace-one ε.

One job each:

* :class:`GaussianAccountant` — the Poisson-subsampled Gaussian mechanism (DP-SGD steps and
  DP-FedAvg rounds) under replace-one. With sensitivity 1 (a clipped gradient of norm ≤ 1 in units
  of the clip) and noise σ, the dominating pair of one step is
  ``P = (1-q)·N(0, σ²) + q·N(-1, σ²)`` against ``Q = (1-q)·N(0, σ²) + q·N(+1, σ²)``
  (the replaced record's gradient is u, the new one v, ``‖u - v‖ ≤ 2`` at worst with u = -v;
  Lebeda, Regehr, Kamath & Steinke 2024, "Avoiding pitfalls for privacy accounting of subsampled
  mechanisms under composition"; the same pair as ``dp_accounting``'s ``REPLACE_ONE`` PLD). At
  q = 1 it is the Gaussian mechanism of sensitivity 2. Two accountants compose it:
  ``prv`` (privacy random variables, Gopi, Lee & Wutschitz 2021: this pair's privacy-loss CDF in
  closed form, discretised and composed by Opacus' own PRV machinery, ``discretize`` and
  ``compose_heterogeneous``) and ``rdp`` (Rényi DP of the pair by numerical integration, composed
  additively and converted with Canonne, Kamath & Steinke 2020, Prop. 12). ``tests/
  test_privacy_relation.py`` checks both against Google's ``dp_accounting`` PLD under REPLACE_ONE.
  The add/remove-one accountants (Opacus' ``rdp``/``prv``) stay available as
  ``relation="add-remove"`` for comparison only; nothing in a run uses them.
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

import numpy as np

ACCOUNTANTS = ("prv", "rdp")
RELATION = "replace-one"
"""The one neighbouring relation every ε of a run is accounted under (see the module docstring)."""
RELATIONS = (RELATION, "add-remove")


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
    """Subsampled Gaussian composition under ``relation`` (replace-one unless a test asks otherwise)."""

    def __init__(self, name: str, relation: str = RELATION) -> None:
        if name not in ACCOUNTANTS:
            raise ValueError(f"privacy.accountant must be one of {', '.join(ACCOUNTANTS)}, got {name!r}")
        if relation not in RELATIONS:
            raise ValueError(f"neighbouring relation must be one of {', '.join(RELATIONS)}, got {relation!r}")
        self.name = name
        self.relation = relation

    def epsilon(self, history: Sequence[GaussianRelease], delta: float) -> float:
        if self.relation == "add-remove":
            return _opacus_epsilon(self.name, merge(history), float(delta))
        return _replace_one_epsilon(self.name, merge(history), float(delta))


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
# Replace-one: the Poisson-subsampled Gaussian pair P = (1-q)N(0,σ²)+qN(-1,σ²), Q = (1-q)N(0,σ²)+qN(1,σ²)
# ---------------------------------------------------------------------------------------------

RDP_ORDERS = (*(1 + x / 10 for x in range(1, 100)), *range(11, 64), 80, 100, 128, 160, 200, 256)


@lru_cache(maxsize=4096)
def replace_one_rdp(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    """Rényi divergence ``D_α(P || Q)`` of one replace-one step at each of :data:`RDP_ORDERS`.

    The pair is symmetric (x → -x swaps P and Q), so one direction is the whole answer. The integral
    ``∫ P^α Q^(1-α)`` is a trapezoid sum in log space over a grid of step σ/10 that covers the tilted
    mass (it peaks no further left than x = 1 - 2α, with width σ). The trapezoid rule is exponentially accurate for
    such smooth, fast-decaying integrands (error ~ exp(-2π²σ²/h²)); at q = 1 it returns the Gaussian's
    exact ``2α/σ²`` to 1e-9 (a test checks it)."""
    from scipy.special import logsumexp

    sigma, q = float(noise_multiplier), float(sample_rate)
    orders = np.asarray(RDP_ORDERS, dtype=np.float64)
    h = sigma / 10
    x = np.arange(-(2 * orders.max() + 14 * sigma + 3), 14 * sigma + 3, h)
    logphi = -0.5 * (x / sigma) ** 2
    log_p = logphi + np.logaddexp(np.log1p(-q) if q < 1 else -np.inf, math.log(q) - (2 * x + 1) / (2 * sigma * sigma))
    log_q = logphi + np.logaddexp(np.log1p(-q) if q < 1 else -np.inf, math.log(q) + (2 * x - 1) / (2 * sigma * sigma))
    norm = math.log(h) - 0.5 * math.log(2 * math.pi * sigma * sigma)
    out = []
    for a in orders:
        integrand = a * log_p + (1 - a) * log_q
        out.append(float((logsumexp(integrand) + norm) / (a - 1)))
    return tuple(max(v, 0.0) for v in out)


class ReplaceOnePRV:
    """The privacy loss ``L = log P(X)/Q(X)``, ``X ~ P``, of one replace-one step, as Opacus' PRV
    machinery wants it (``cdf``; ``noise_multiplier``/``sample_rate`` for its bookkeeping).

    ``L(x)`` falls with x, and ``L(x) = t`` is a quadratic in ``a = exp(x/σ²)``:
    ``e^t q c a² + (1-q)(e^t - 1) a - q c = 0`` with ``c = exp(-1/(2σ²))``; its positive root, in a
    form without cancellation on either side of t = 0, gives ``x(t)`` and
    ``P(L ≤ t) = P(X ≥ x(t)) = (1-q)·Φ̄(x/σ) + q·Φ̄((x+1)/σ)``."""

    def __init__(self, sample_rate: float, noise_multiplier: float) -> None:
        self.sample_rate = float(sample_rate)
        self.noise_multiplier = float(noise_multiplier)

    def threshold(self, t):
        q, s = self.sample_rate, self.noise_multiplier
        t = np.asarray(t, dtype=np.float64)
        log2qc = math.log(2 * q) - 1 / (2 * s * s)
        q2c2 = (q * math.exp(-1 / (2 * s * s))) ** 2
        pos = t >= 0
        tp = np.where(pos, t, 0.0)
        tn = np.where(pos, 0.0, t)
        b_pos = (1 - q) * -np.expm1(-tp)
        log_a_pos = log2qc - tp - np.log(b_pos + np.sqrt(b_pos * b_pos + 4 * q2c2 * np.exp(-tp)))
        b_neg = (1 - q) * -np.expm1(tn)
        log_a_neg = np.log(b_neg + np.sqrt(b_neg * b_neg + 4 * q2c2 * np.exp(tn))) - tn - log2qc
        return s * s * np.where(pos, log_a_pos, log_a_neg)

    def cdf(self, t):
        from scipy.special import ndtr

        q, s = self.sample_rate, self.noise_multiplier
        x = self.threshold(t)
        return (1 - q) * ndtr(-x / s) + q * ndtr(-(x + 1) / s)


def _replace_one_rdp_epsilon(history: tuple[GaussianRelease, ...], delta: float) -> float:
    rdp = np.zeros(len(RDP_ORDERS))
    for h in history:
        rdp += h.steps * np.asarray(replace_one_rdp(h.noise_multiplier, h.sample_rate))
    return rdp_to_epsilon(RDP_ORDERS, rdp.tolist(), delta)


def _replace_one_prv_epsilon(history: tuple[GaussianRelease, ...], delta: float, eps_error: float = 0.01) -> float:
    """Opacus' PRV composition (Gopi et al. 2021, as in ``opacus.accountants.PRVAccountant``) of the
    replace-one PRVs; the truncation domain is sized with the replace-one RDP bound, as Opacus sizes
    it with its RDP bound (Gopi et al., Remark 5.6). Returns the upper end of the error band."""
    from opacus.accountants.analysis.prv import Domain, TruncatedPrivacyRandomVariable, compose_heterogeneous, discretize

    delta_error = delta / 1000
    steps = [h.steps for h in history]
    total = sum(steps)
    big = _replace_one_rdp_epsilon(history, delta_error / 4)
    for h in history:
        big = max(big, _replace_one_rdp_epsilon((GaussianRelease(h.noise_multiplier, h.sample_rate, 1),), delta_error / (8 * total)))
    size = max(big, eps_error) + 3
    mesh = eps_error / math.sqrt(total * math.log(12 / delta_error) / 2)
    domain = Domain.create_aligned(-size, size, mesh)
    prvs = [TruncatedPrivacyRandomVariable(ReplaceOnePRV(h.sample_rate, h.noise_multiplier), domain.t_min, domain.t_max) for h in history]
    dprv = compose_heterogeneous(dprvs=[discretize(p, domain) for p in prvs], num_self_compositions=steps)
    _, _, eps_upper = dprv.compute_epsilon(delta, delta_error, eps_error)
    return float(eps_upper)


@lru_cache(maxsize=4096)
def _replace_one_epsilon(name: str, history: tuple[GaussianRelease, ...], delta: float) -> float:
    if not history:
        return 0.0
    if any(h.noise_multiplier <= 0 for h in history):
        return math.inf
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        if name == "rdp":
            return _replace_one_rdp_epsilon(history, delta)
        return _replace_one_prv_epsilon(history, delta)


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
