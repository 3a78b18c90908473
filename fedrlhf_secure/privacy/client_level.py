"""Client-level (user-level) DP: DP-FedAvg (McMahan, Ramage, Talwar & Zhang 2018).

Each client clips its whole update vector to L2 norm C (:func:`.clipping.clip_l2`) and the sum of
the clipped updates gets Gaussian noise of std ``z·C``, where the noise multiplier z is calibrated
so that ``federation.rounds`` releases cost at most the budget ε.

**Relation: one client's data replaced** (replace-one, :data:`.accountants.RELATION`): which
clients take part is visible to the server, so a neighbouring run has the same clients and one of
them holds other data. Its clipped update moves from u to v with ``‖u - v‖ ≤ 2C``: the Gaussian
accountant at q = 1 under replace-one is the Gaussian mechanism of sensitivity 2C (z is about
twice the add/remove-one figure for the same ε), and the Skellam sensitivities are doubled
(:func:`.discrete.integer_sensitivities`). With uniform weights (one per client) that bound holds
for the released sum; the plan refuses example weighting (its weights depend on the data and the
noise assumes a plain mean). Sampling amplification is not claimed: the server knows whom it
selected, so each client's ε composes the rounds it actually took part in (q = 1 per round).

Where the noise is added (``privacy.noise``):

* ``central``: the server adds N(0, (zC)²) after aggregation. The server therefore sees the
  un-noised sum (and, with plain aggregation, every clipped update); only later observers of the
  model are protected.
* ``distributed``: each client adds its share so that no party ever sees an un-noised sum. For
  float aggregators (plain, CKKS) the share is N(0, (zC)²/(m-1)); for the integer masking aggregator
  it is Skellam noise of variance μ/(m-1) in the quantised domain (:mod:`.discrete`), calibrated
  with the Skellam accountant. ``m`` is the number of survivors the round must keep
  (:func:`survivors_required`, the one place this rule lives). **m - 1, not m**: every client
  reads the released aggregate and knows its own share, so against a curious participant j the
  noise protecting another client k is the sum of the m - 1 shares other than j's; sizing each share
  for m - 1 makes any m - 1 of them carry the full calibrated variance (:func:`share_divisor`;
  with m = 1 the one share carries it all). Dropouts are **compensated** by adding enough noise for ``m``
  survivors: a round that ends with fewer contributors is discarded by the server's half
  (:mod:`.server`; with masking, set the secure aggregation threshold to at least m so the
  server cannot unmask such a sum).

**Adaptive clipping** (``privacy.adaptive_clip``, :mod:`.adaptive_clipping`): the clip norm of
round t is C_t, recomputed from the released noised counts; the vector ends with the count slot,
which :meth:`ClientLevelPlan.clip` fills with the client's scaled clipped-count bit ``α(b − ½)``, and
the noise is sized for the augmented bound ``C_aug = C_t·z_Δ/z`` at multiplier z, so the ledger
entry is the fixed-clip entry at z (with the split recorded in its params).

This module is the client's half; the server's half (:mod:`.server`) adds the ``central`` noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .accountants import GaussianAccountant, GaussianRelease, SkellamAccountant, SkellamRelease
from .adaptive_clipping import AdaptiveClipConfig, ClipSchedule, CountRelease
from .budget import BudgetedPlan, PrivacyViolation
from .calibration import gaussian_noise_multiplier, skellam_variance
from .clipping import clip_l2
from .discrete import integer_sensitivities
from .dpsgd import DPSGDReport, DPSGDSettings
from .ledger import LedgerEntry, PrivacyLedger
from .noise import NoiseSource
from .plan import Release
from .replay import ReleaseStore


def dp_fedavg_noise_multiplier(accountant: str, epsilon: float | None, delta: float, rounds: int, explicit: float | None) -> float:
    """DP-FedAvg's z: ``privacy.noise_multiplier`` when given, else calibrated so that ``rounds``
    releases at q = 1 cost at most ε. The clients' half, the server's half (central noise) and the
    masking headroom check all size the noise with this one function."""
    if explicit is not None:
        return float(explicit)
    assert epsilon is not None
    return gaussian_noise_multiplier(GaussianAccountant(accountant), epsilon, delta, 1.0, rounds)


def share_divisor(survivors: int) -> int:
    """How many shares the distributed noise's variance is split into: ``m - 1`` for m survivors (a
    participant that reads the aggregate subtracts its own share), at least 1."""
    return max(1, int(survivors) - 1)


def accountant_name(accountant: str, integer: bool) -> str:
    """Distributed shares in an integer (masking) aggregator are Skellam noise, accounted as such."""
    return SkellamAccountant.name if integer else accountant


def survivors_required(admitted: int, min_clients: int, survivor_fraction: float) -> int:
    """How many contributors a round's distributed noise is sized for: ``max(min_clients,
    ceil(survivor_fraction × admitted))``, at most ``admitted``. Both halves use this one rule: the
    clients size their shares with it, the server discards an aggregate with fewer contributors."""
    n = max(1, int(admitted))
    return min(n, max(int(min_clients), math.ceil(float(survivor_fraction) * n)))


@dataclass(frozen=True)
class IntegerDomain:
    """The masking aggregator's quantisation: a float x becomes round(scale · x)."""

    scale: float


class ClientLevelPlan(BudgetedPlan):
    mode = "client"

    def __init__(
        self,
        *,
        rounds: int,
        clip_norm: float,
        noise: str,
        budget: float | None,
        delta: float,
        accountant: str,
        noise_multiplier: float | None,
        survivor_fraction: float,
        min_clients: int,
        integer: IntegerDomain | None,
        ledger: PrivacyLedger,
        releases: ReleaseStore,
        noise_source: NoiseSource,
        adaptive: AdaptiveClipConfig | None = None,
    ) -> None:
        super().__init__(budget=budget, delta=delta, ledger=ledger, releases=releases, noise=noise_source)
        if noise not in ("central", "distributed"):
            raise ValueError(f"privacy.noise must be central or distributed, got {noise!r}")
        if integer is not None and noise != "distributed":
            raise ValueError("integer (Skellam) noise is only used with privacy.noise: distributed")
        self.rounds = int(rounds)
        self.clip_norm = float(clip_norm)
        self.placement = noise
        self.survivor_fraction = float(survivor_fraction)
        self.min_clients = int(min_clients)
        self.integer = integer
        self.gaussian = GaussianAccountant(accountant)
        self.skellam = SkellamAccountant()
        self._explicit = noise_multiplier
        self.z = dp_fedavg_noise_multiplier(accountant, budget, delta, self.rounds, noise_multiplier)
        self._skellam_params: tuple[float, float, float] | None = None  # (variance, l1, l2) of the latest sized release
        self._skellam_cache: dict[tuple[float, int], tuple[float, float, float]] = {}
        self._sized_dim: int | None = None  # the vector's dimension, once a release was sized
        self._survivors: dict[int, int] = {}
        self.schedule = None if adaptive is None else ClipSchedule(self.clip_norm, adaptive, self.z)
        """C_t from the released counts (adaptive clipping), or None for a fixed ``clip_norm``."""
        self._round_clip: dict[int, float] = {}
        self._current_round: int | None = None

    # ------------------------------------------------------------------ the round's clip norm
    def observe_counts(self, round: int, history: Sequence[CountRelease]) -> None:
        """The released clipped counts of the rounds before ``round`` (adaptive clipping); a fixed-clip
        plan refuses any, so a server cannot make it believe it adapts."""
        if self.schedule is None:
            if history:
                raise PrivacyViolation(f"round {round}: released clip counts sent, but this plan's clip norm is fixed")
            return
        try:
            self.schedule.adopt(history, round)
        except ValueError as exc:
            raise PrivacyViolation(f"round {round}: {exc}") from exc

    def round_clip(self, round: int) -> float:
        """C_t: the update's clip norm in ``round`` (``clip_norm`` unless adaptive)."""
        if self.schedule is None:
            return self.clip_norm
        if round not in self._round_clip:
            raise PrivacyViolation(f"round {round}: the adaptive clip norm was asked for before the round began")
        return self._round_clip[round]

    def vector_clip(self, round: int) -> float:
        """The L2 bound the noise is sized for: C_t, or C_aug = C_t·z_Δ/z with the count slot."""
        clip = self.round_clip(round)
        return clip if self.schedule is None else self.schedule.augmented_clip(clip)

    # ------------------------------------------------------------------ integer domain
    def _ensure_skellam(self, dim: int, clip: float | None = None) -> tuple[float, float, float]:
        clip = self.clip_norm if clip is None else float(clip)
        key = (clip, int(dim))
        if key not in self._skellam_cache:
            assert self.integer is not None
            l1, l2 = integer_sensitivities(self.integer.scale, clip, dim)
            if self._explicit is not None:
                variance = (self._explicit * l2 / 2) ** 2  # std = z·(s·C + √d); l2 is the replace-one 2(s·C + √d)
            else:
                variance = skellam_variance(self.budget, self.delta, l1, l2, self.rounds)
            self._skellam_cache[key] = (variance, l1, l2)
        self._skellam_params = self._skellam_cache[key]
        self._sized_dim = int(dim)
        return self._skellam_params

    def _planned_skellam(self) -> SkellamRelease:
        if self._skellam_params is not None:
            v, l1, l2 = self._skellam_params
            return SkellamRelease(v, l1, l2, 1)
        clip = self.clip_norm if self.schedule is None else self.schedule.augmented_clip(self.clip_norm)
        l2 = 2 * self.integer.scale * clip  # type: ignore[union-attr]  (replace-one: 2C)
        variance = (self.z * l2 / 2) ** 2  # z (replace-one, sensitivity 2C) or the explicit multiplier, per unit of 2C
        return SkellamRelease(variance, l2, l2, 1)

    def begin_round(self, round: int, participants: int) -> None:
        self._survivors[round] = survivors_required(participants, self.min_clients, self.survivor_fraction)
        if self.schedule is not None:
            self._round_clip[round] = self.schedule.clip_for(round)
        self._current_round = round

    def survivors_required(self, round: int) -> int:
        """Set by :meth:`begin_round` from the round's federation-wide participant count (never from
        the clients this host happens to hold)."""
        if round not in self._survivors:
            raise PrivacyViolation(f"round {round}: the noise share was asked for before the round's participants were known")
        return self._survivors[round]

    def minimum_contributors(self, round: int) -> int:
        return self.survivors_required(round) if self.placement == "distributed" else 0

    # ------------------------------------------------------------------ BudgetedPlan
    def history_of(self, entries: Sequence[LedgerEntry]) -> list[Any]:
        if self.integer is not None:
            return [SkellamRelease(e.params["variance"], e.params["l1"], e.params["l2"], e.steps) for e in entries]
        return [GaussianRelease(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]

    def history_epsilon(self, history: Sequence[Any]) -> float:
        if self.integer is not None:
            return self.skellam.epsilon(history, self.delta)
        return self.gaussian.epsilon(history, self.delta)

    def next_history(self, client_id: int) -> list[Any]:
        past = self.history_of(self.ledger.entries(client_id))
        planned = self._planned_skellam() if self.integer is not None else GaussianRelease(self.z, 1.0, 1)
        return [*past, planned]

    def dpsgd_settings(self, client_id: int, round: int) -> DPSGDSettings | None:
        return None

    def clip(self, vector: np.ndarray) -> np.ndarray:
        """Clip to C (fixed), or (adaptive) clip all but the count slot to C_t and write the slot:
        ``α(b − ½)`` with ``b = 1[‖Δ‖ ≤ C_t]`` (the bit is then noised with the rest, never sent alone)."""
        v = np.asarray(vector, dtype=np.float32)
        if self.schedule is None:
            return clip_l2(v, self.clip_norm)
        if self._current_round is None:
            raise PrivacyViolation("an update was clipped before its round began (the adaptive clip norm is per round)")
        clip = self.round_clip(self._current_round)
        model = v[:-1]
        norm = float(np.linalg.norm(model.astype(np.float64)))
        out = np.empty_like(v)
        out[:-1] = clip_l2(model, clip)
        out[-1] = np.float32(self.schedule.bit_coordinate(norm, clip))
        return out

    def add_noise(self, client_id: int, round: int, clipped: np.ndarray, weight: float) -> Release:
        if weight != 1.0:
            raise PrivacyViolation(
                f"client-level DP needs uniform weights (federation.weighting: uniform); client {client_id} has weight {weight}"
            )
        if self.placement == "central":
            return Release(clipped, 1.0)  # the server's half adds N(0, (zC)²) to the sum
        k = share_divisor(self.survivors_required(round))
        if self.integer is not None:
            variance, _, _ = self._ensure_skellam(clipped.size, self.vector_clip(round))
            return Release(clipped, 1.0, np.asarray(self.noise.skellam(variance / k, clipped.size), dtype=np.int64))
        std = self.z * self.vector_clip(round) / math.sqrt(k)
        noisy = clipped.astype(np.float64) + self.noise.gaussian(std, clipped.size)
        return Release(np.asarray(noisy, dtype=np.float32), 1.0)

    def entry_for(self, client_id: int, round: int, report: DPSGDReport | None, digest: str) -> LedgerEntry:
        params: dict[str, float] = {}
        if self.placement == "distributed":
            params["survivors_required"] = float(self.survivors_required(round))
        if self.schedule is not None:
            clip = self.round_clip(round)
            params.update(
                clip_norm=clip,
                vector_clip=self.schedule.augmented_clip(clip),
                update_noise_multiplier=self.schedule.z_update,
                count_noise=self.schedule.config.count_noise,
                count_scale=self.schedule.count_scale(clip),
                target_quantile=self.schedule.config.target_quantile,
            )
        if self.integer is not None:
            dim = self._sized_dim if self._sized_dim is not None else self._replayed_dim(client_id, round)
            variance, l1, l2 = self._ensure_skellam(dim, self.vector_clip(round))
            params.update(variance=variance, l1=l1, l2=l2, scale=self.integer.scale)
            return LedgerEntry(
                client=client_id,
                round=round,
                mechanism="skellam",
                noise_multiplier=math.sqrt(variance) / l2,
                sample_rate=1.0,
                steps=1,
                sensitivity=l2,
                epsilon_after=math.nan,
                delta=self.delta,
                digest=digest,
                noise=self.placement,
                params=params,
            )
        return LedgerEntry(
            client=client_id,
            round=round,
            mechanism="gaussian",
            noise_multiplier=self.z,
            sample_rate=1.0,
            steps=1,
            sensitivity=self.vector_clip(round),
            epsilon_after=math.nan,
            delta=self.delta,
            digest=digest,
            noise=self.placement,
            params=params,
        )

    def _replayed_dim(self, client_id: int, round: int) -> int:
        release = self.releases.load(client_id, round)
        if release is None:
            raise PrivacyViolation(f"client {client_id} round {round}: commit of an integer release that was never sized")
        return int(np.size(release.vector))
