"""``aggregation: {kind: secagg, ...}``: the typed, validated parameters of pairwise masking.

Defaults are chosen so the MovieLens federation runs unchanged: weights are raw example counts
(tens to hundreds of ratings per user, so ``max_weight: 1000``), vectors hold parameter deltas and
0/1 touch indicators (so ``clip_range: 1.0`` clips nothing that matters), and ``bits/levels: auto``
pick 32-bit arithmetic with as many levels as the headroom allows (64-bit when it would leave
fewer than 2^10).

``neighbours: auto`` and ``threshold: auto`` are chosen per round from the stated bounds
``colluders`` (γ, a fraction of the round's clients that may work with a malicious server) and
``dropouts`` (δ), with every failure probability at most 2^-``failure_exponent``, by
:func:`.params.secagg_parameters` (SecAgg+, Bell et al., CCS 2020, with the consistency round of
Bonawitz et al., CCS 2017): at the defaults γ = δ = 0.1, σ = 40 that is k = 32, t = 17 at n = 100,
k = 58, t = 30 at n = 1000, the complete graph up to n = 6 (``fedrlhf secagg-params`` prints them).
Explicit ``neighbours`` / ``threshold`` are checked against the same bounds; a choice that cannot
hold them is refused before the round with the numbers that fail.

Identity signatures are always on: every advertised key pair and every survivor set is signed
with the client's registered Ed25519 identity (in-process, the run generates and registers them;
a deployment loads the registry ``fedrlhf keys secagg`` writes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from .params import DEFAULT_COLLUDERS, DEFAULT_DROPOUTS, DEFAULT_FAILURE_EXPONENT, SecAggParameters, check, evaluate, secagg_parameters
from .quantize import Quantizer, plan


@dataclass(frozen=True)
class SecAggConfig:
    """Pairwise masking (SecAgg / SecAgg+) parameters; see the module docstring for the defaults."""

    neighbours: int | Literal["auto"] = "auto"
    """Degree k of the masking graph; ``auto`` = the smallest that meets the bounds; k >= n-1 is classic SecAgg."""
    threshold: int | Literal["auto"] = "auto"
    """Shamir threshold t; ``auto`` = the one with the widest margin at k. A round aborts when fewer than t survive."""
    colluders: float = DEFAULT_COLLUDERS
    """γ: fraction of a round's clients (rounded up) that may collude with the server."""
    dropouts: float = DEFAULT_DROPOUTS
    """δ: fraction of a round's clients (rounded up) that may drop out and the round still completes."""
    failure_exponent: int = DEFAULT_FAILURE_EXPONENT
    """σ: each failure probability (privacy, dropout, partition) is at most 2^-σ."""
    clip_range: float = 1.0
    """Each coordinate is clipped to [-clip_range, clip_range] before quantisation."""
    bits: int | Literal["auto"] = "auto"
    """Modulus 2^bits of the masked arithmetic: 32, 64, or auto (32 unless the headroom needs 64)."""
    levels: int | Literal["auto"] = "auto"
    """Quantisation levels per clip_range of a weighted coordinate (scale = levels / clip_range)."""
    max_weight: float = 1000.0
    """Largest client weight (example count) admitted; larger weights are refused, never wrapped."""
    weight_resolution: float = 1.0 / 1024
    """Weights are rounded to multiples of this (the rounded weight is used consistently)."""
    noise_bound: int = 0
    """Headroom reserved per coordinate for distributed integer DP noise, in quantised units."""

    def __post_init__(self) -> None:
        if self.neighbours != "auto" and self.neighbours < 1:
            raise ValueError(f"neighbours must be >= 1 or 'auto', got {self.neighbours}")
        if self.threshold != "auto":
            if self.threshold < 1:
                raise ValueError(f"threshold must be >= 1 or 'auto', got {self.threshold}")
            if self.neighbours != "auto" and self.threshold > self.neighbours:
                raise ValueError(
                    f"threshold {self.threshold} exceeds neighbours {self.neighbours}: shares go to the k neighbours, so t must be <= k"
                )
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            raise ValueError(f"clip_range must be a positive number, got {self.clip_range}")
        if self.bits not in ("auto", 32, 64):
            raise ValueError(f"bits must be 32, 64 or 'auto', got {self.bits!r}")
        if self.levels != "auto" and self.levels < 1:
            raise ValueError(f"levels must be >= 1 or 'auto', got {self.levels}")
        if not (math.isfinite(self.max_weight) and self.max_weight > 0):
            raise ValueError(f"max_weight must be a positive number, got {self.max_weight}")
        if not (math.isfinite(self.weight_resolution) and 0 < self.weight_resolution <= self.max_weight):
            raise ValueError(f"weight_resolution must be in (0, max_weight], got {self.weight_resolution}")
        if self.noise_bound < 0:
            raise ValueError(f"noise_bound must be >= 0, got {self.noise_bound}")
        if not (0 <= self.colluders < 1 and 0 <= self.dropouts < 1):
            raise ValueError(f"colluders ({self.colluders}) and dropouts ({self.dropouts}) must be fractions in [0, 1)")
        if not 1 <= self.failure_exponent <= 128:
            raise ValueError(f"failure_exponent must be in 1..128, got {self.failure_exponent}")

    def parameters(self, n: int) -> SecAggParameters:
        """k, t, quorum and failure probabilities for a round of ``n``; :class:`.params.ParameterError` if the
        bounds cannot hold (auto) or the explicit k / t do not hold them."""
        bounds = {"colluders": self.colluders, "dropouts": self.dropouts, "failure_exponent": self.failure_exponent}
        if self.neighbours == "auto" and self.threshold == "auto":
            return secagg_parameters(n, **bounds)
        if self.neighbours == "auto":  # an explicit t: the smallest k that holds with it
            for k in [*range(max(self.threshold, 2), n - 1), n - 1]:
                p = evaluate(n, k, self.threshold, **bounds)
                if p.log2_failure <= -self.failure_exponent and p.quorum <= n - p.dropouts:
                    return p
            return check(evaluate(n, n - 1, self.threshold, **bounds))
        k = min(self.neighbours, n - 1)
        if self.threshold == "auto":
            scores = [evaluate(n, k, t, **bounds) for t in range(1, k + 1)]
            best = min(p.log2_failure for p in scores)
            ties = [p for p in scores if p.log2_failure == best]
            return check(ties[len(ties) // 2])
        return check(evaluate(n, k, self.threshold, **bounds))

    def degree(self, n: int) -> int:
        """Neighbours per client in a round of ``n`` participants."""
        return self.parameters(n).k

    def shamir_threshold(self, n: int) -> int:
        """Shamir threshold for a round of ``n`` participants."""
        return self.parameters(n).t

    def quantizer(self, max_clients: int) -> Quantizer:
        """The fixed-point encoding for up to ``max_clients`` (raises :class:`HeadroomError` if it could wrap)."""
        return plan(
            clip=self.clip_range,
            levels=self.levels,
            bits=self.bits,
            max_weight=self.max_weight,
            weight_resolution=self.weight_resolution,
            max_clients=max_clients,
            noise_bound=self.noise_bound,
        )
