"""Fixed-point encoding of a weighted update, with a headroom check that rules out wrap-around.

Masked sums live in Z_{2^bits} (bits = 32, or 64 when n x range needs it). A client's
contribution is::

    q_k = stochastic_round( w_k * clip(x_k, -c, c) * scale )  (+ integer DP noise)   in Z^d
    u_k = round(w_k / weight_resolution)                                              in Z

sent as the vector ``[q_k, u_k]`` of length d + 1, so the server learns only the two sums
``sum w_k x_k`` and ``sum w_k`` (the weight is folded in *before* masking; Bonawitz et al. 2017 §2).
``scale = levels / c``: one quantisation unit is ``c / levels`` of a weighted coordinate.

Why stochastic rounding: ``E[q_k] = w_k x_k scale`` exactly, so quantisation adds zero-mean noise
of at most one unit per client instead of a bias (Gupta et al., ICML 2015; Kairouz et al.,
ICML 2021 "The distributed discrete Gaussian"). The coins are 32-bit integers from the AES-256-CTR
keystream of a fresh ``os.urandom`` key (:class:`.prg.Keystream`, the same vetted PRF as the masks;
never numpy's generator): ``q = floor(s + u / 2^32)`` rounds ``s`` up with probability within
2^-32 of its fractional part, and the float64 sum adds at most the rounding of ``s`` itself
(below 2^-21 of a unit at the largest 32-bit headroom, |s| < 2^31). The whole encoding runs in
cache-sized pieces with per-thread scratch (issue 16: the float64 ``rng.random(d)`` coins were the
largest arithmetic cost of a client's encoding).

Why a headroom check: with ``N`` clients the exact sum is recovered from Z_{2^bits} only when
``sum_k |q_k| < 2^(bits-1)``. Every client is therefore held to the per-client bound
``B = floor((2^(bits-1) - 1) / N)``; :func:`plan` refuses parameters where ``max_weight * levels
+ noise_bound > B``, and :meth:`Quantizer.encode` refuses a weight above ``max_weight`` or noise
that would cross ``B``, naming the numbers. Flower 1.42 silently returns a wrong sum when a
weight exceeds its ``max_weight``; we refuse instead and never return one.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass

import numpy as np

from ..errors import AggregationConfigError
from . import prg

MAX_LEVELS = 1 << 24
"""Above 2^24 levels float32 inputs carry no more precision."""
MIN_AUTO_LEVELS_32 = 1 << 10
"""``bits: auto`` moves to 64-bit arithmetic when 32 bits would leave fewer levels than this."""
_PIECE = prg.CHUNK_BYTES // 8
"""Coordinates encoded per piece: two float64 scratch buffers of 256 KiB each stay in cache."""
_LOCAL = threading.local()


def _float_scratch() -> tuple[np.ndarray, np.ndarray]:
    bufs = getattr(_LOCAL, "bufs", None)
    if bufs is None:
        bufs = _LOCAL.bufs = (np.empty(_PIECE, np.float64), np.empty(_PIECE, np.float64))
    return bufs


class HeadroomError(AggregationConfigError):
    """The configured range, weights, noise and client count could wrap the modular sum."""


@dataclass(frozen=True)
class Quantizer:
    """Resolved fixed-point parameters for one run (``max_clients`` participants at most)."""

    clip: float
    levels: int
    bits: int
    max_weight: float
    weight_resolution: float
    max_clients: int
    noise_bound: int = 0

    @property
    def scale(self) -> float:
        """Quantised units per unit of a weighted coordinate ``w * x`` (DP noise is calibrated in these units)."""
        return self.levels / self.clip

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint32 if self.bits == 32 else np.uint64)

    @property
    def client_bound(self) -> int:
        """Largest ``|coordinate|`` one client may contribute without risking wrap-around."""
        return ((1 << (self.bits - 1)) - 1) // self.max_clients

    @property
    def max_weight_units(self) -> int:
        return math.ceil(self.max_weight / self.weight_resolution)

    def check(self, dim: int, weight: float, integer_noise: np.ndarray | None = None) -> int:
        """Validate a client's weight and noise against the headroom; return the weight in units.

        Called when the client half is built, so an over-large weight or noise is refused before
        the round starts: ``|q| <= ceil(w * levels) + max|noise| <= client_bound`` is guaranteed.
        """
        weight = float(weight)
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight must be a finite non-negative number, got {weight}")
        if weight > self.max_weight:
            raise HeadroomError(
                f"weight {weight:g} exceeds aggregation.max_weight={self.max_weight:g}; the masked sum "
                f"of {self.max_clients} clients is only guaranteed not to wrap for weights up to that bound "
                "(raise max_weight, which may switch bits to 64 or lower levels)"
            )
        units = int(round(weight / self.weight_resolution))
        noise_peak = 0
        if integer_noise is not None:
            noise = np.asarray(integer_noise)
            if noise.dtype != np.int64 or noise.shape != (dim,):
                raise ValueError(f"integer_noise must be int64 of shape ({dim},), got {noise.dtype} {noise.shape}")
            noise_peak = int(np.abs(noise).max()) if noise.size else 0
        peak = math.ceil(units * self.weight_resolution * self.levels) + noise_peak
        if peak > self.client_bound:
            raise HeadroomError(
                f"a quantised coordinate may reach {peak} (weight {weight:g} x levels {self.levels} + noise "
                f"{noise_peak}) but each of {self.max_clients} clients may contribute at most {self.client_bound} "
                f"in {self.bits}-bit arithmetic; the sum could wrap (noise_bound={self.noise_bound})"
            )
        return units

    def encode(
        self,
        vector: np.ndarray,
        weight: float,
        *,
        integer_noise: np.ndarray | None = None,
        rng: np.random.Generator | None = None,
        coin_key: bytes | None = None,
    ) -> np.ndarray:
        """``[q, u]`` as ``dtype`` (two's complement), ready to be masked.

        ``coin_key`` (32 bytes) keys the rounding coins' keystream; by default a fresh
        ``os.urandom`` key. ``rng`` exists for reproducible tests only: the key is then drawn from it.
        """
        vec = np.asarray(vector)
        if vec.ndim != 1:
            raise ValueError(f"update must be a flat vector, got shape {vec.shape}")
        units = self.check(vec.size, weight, integer_noise)
        if not np.all(np.isfinite(vec)):
            raise ValueError("update contains NaN or infinity")
        if coin_key is None:
            coin_key = rng.bytes(prg.SEED_BYTES) if rng is not None else os.urandom(prg.SEED_BYTES)
        coins = prg.Keystream(coin_key)
        factor = units * self.weight_resolution * self.scale
        bound = self.clip * factor
        out = np.empty(vec.size + 1, dtype=self.dtype)
        signed = out.view(np.int32 if self.bits == 32 else np.int64)  # two's complement view of Z_{2^bits}
        scaled_buf, coin_buf = _float_scratch()
        for start in range(0, vec.size, _PIECE):
            stop = min(vec.size, start + _PIECE)
            scaled, u = scaled_buf[: stop - start], coin_buf[: stop - start]
            np.multiply(vec[start:stop], factor, out=scaled, dtype=np.float64)
            np.clip(scaled, -bound, bound, out=scaled)
            np.multiply(coins.uint32(stop - start), 2.0**-32, out=u)  # u in [0, 1), 32 random bits
            scaled += u
            np.floor(scaled, out=scaled)
            np.copyto(signed[start:stop], scaled, casting="unsafe")  # |q| <= client_bound (check above): no overflow
        if integer_noise is not None:
            np.add(signed[:-1], integer_noise, out=signed[:-1], casting="unsafe")
        signed[-1] = units
        return out

    def decode(self, summed: np.ndarray) -> tuple[np.ndarray, float]:
        """``(sum w x, sum w)`` from the unmasked modular sum of the ``[q, u]`` vectors."""
        signed = np.asarray(summed, dtype=self.dtype).view(np.int32 if self.bits == 32 else np.int64)
        return signed[:-1].astype(np.float64) / self.scale, float(signed[-1]) * self.weight_resolution


def plan(
    *,
    clip: float,
    levels: int | str,
    bits: int | str,
    max_weight: float,
    weight_resolution: float,
    max_clients: int,
    noise_bound: int = 0,
) -> Quantizer:
    """Pick ``bits`` (32 unless n x range needs 64) and ``levels``; refuse anything that could wrap."""
    if max_clients < 1:
        raise ValueError(f"max_clients must be >= 1, got {max_clients}")
    candidates = [32, 64] if bits == "auto" else [int(bits)]
    reasons = []
    for b in candidates:
        bound = ((1 << (b - 1)) - 1) // max_clients
        w_units = math.ceil(max_weight / weight_resolution)
        w_eff = w_units * weight_resolution
        if levels == "auto":
            room = (bound - noise_bound) / w_eff if w_eff > 0 else MAX_LEVELS
            lv = 1 << int(math.floor(math.log2(room))) if room >= 1 else 0
            lv = min(lv, MAX_LEVELS)
            if bits == "auto" and b == 32 and lv < MIN_AUTO_LEVELS_32:
                reasons.append(f"32 bits leave only {lv} levels")
                continue
        else:
            lv = int(levels)
        need = math.ceil(w_eff * lv) + noise_bound
        if lv < 1 or need > bound or w_units > bound:
            reasons.append(
                f"{b} bits: {max_clients} clients x (max_weight {max_weight:g} x levels {lv} + noise_bound "
                f"{noise_bound}) = {max_clients * need} exceeds 2^{b - 1} - 1 = {(1 << (b - 1)) - 1}"
            )
            continue
        return Quantizer(clip, lv, b, max_weight, weight_resolution, max_clients, noise_bound)
    raise HeadroomError(
        "the masked sum could wrap around: " + "; ".join(reasons) + " (lower levels, max_weight or noise_bound, or use bits: 64)"
    )
