"""``aggregation: {kind: secagg, ...}``: the typed, validated parameters of pairwise masking.

Defaults are chosen so the MovieLens federation runs unchanged: weights are raw example counts
(tens to hundreds of ratings per user, so ``max_weight: 1000``), vectors hold parameter deltas and
0/1 touch indicators (so ``clip_range: 1.0`` clips nothing that matters), and ``bits/levels: auto``
pick 32-bit arithmetic with as many levels as the headroom allows (64-bit when it would leave
fewer than 2^10).

``neighbours: auto`` and ``threshold: auto`` follow SecAgg+ (Bell et al., CCS 2020, §3–4): a
Harary graph of degree k = O(log n) keeps the sum private and correct with overwhelming
probability against a bounded fraction of corrupt and dropped clients. We use
``k = min(n - 1, 2 * ceil(2 * log2 n))`` (even, so the Harary graph is regular: 14 at n = 100, 20
at n = 1000; k = n - 1, classic SecAgg, below n = 16) and ``t = floor(k / 2) + 1``: a strict
majority of a neighbourhood, so that even a server that lies to different neighbours of a client
about whether it dropped can never collect t shares of its mask key *and* t shares of its
self-mask seed from honest neighbours (each reveals only one of the two; 2t > k).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from .quantize import Quantizer, plan


@dataclass(frozen=True)
class SecAggConfig:
    """Pairwise masking (SecAgg / SecAgg+) parameters; see the module docstring for the defaults."""

    neighbours: int | Literal["auto"] = "auto"
    """Degree k of the masking graph; ``auto`` = 2*ceil(2*log2 n); k >= n-1 is classic SecAgg."""
    threshold: int | Literal["auto"] = "auto"
    """Shamir threshold t; ``auto`` = floor(k/2) + 1. A round aborts when fewer than t survive."""
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
    signatures: bool = False
    """Sign advertised keys with Ed25519 identity keys (active-server defence against impersonation)."""
    identity_dir: str | None = None
    """Directory of ``<cid>.pub`` / ``<cid>.key`` identity keys; None + signatures = keys generated per run."""

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
        if self.identity_dir is not None and not self.signatures:
            raise ValueError("identity_dir is set but signatures is false; set signatures: true to use it")

    def degree(self, n: int) -> int:
        """Neighbours per client in a round of ``n`` participants."""
        if n < 2:
            return 0
        k = 2 * math.ceil(2 * math.log2(n)) if self.neighbours == "auto" else self.neighbours
        return min(k, n - 1)

    def shamir_threshold(self, n: int) -> int:
        """Shamir threshold for a round of ``n`` participants."""
        k = self.degree(n)
        return k // 2 + 1 if self.threshold == "auto" else self.threshold

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
