"""Record-level DP with the noise added once for the whole federation: distributed DP-SGD.

``privacy.mode: record`` with ``privacy.record_noise: distributed`` (or ``central``). With one
client per user (943 MovieLens clients of ~85 ratings each), local DP-SGD (:mod:`.record_level`,
``record_noise: local``) makes every client add the full noise σC to its own tiny batch, so the
aggregate carries √943 ≈ 31 times the noise of one central learner, and held-out accuracy stayed
at the personal-embedding floor (0.638-0.640 for every ε from 1 to 8, docs/dp.md). Here the
clients instead compute one DP-SGD step *together* (Kairouz, Liu & Steinke 2021, "The distributed
discrete Gaussian mechanism for federated learning with secure aggregation"; Agarwal, Kairouz &
Liu 2021 for the Skellam variant used with integer masking):

1. every client computes ``g_k = Σ_{i ∈ D_k} clip_C(∇ℓ_i(θ_t))``, the sum of its per-record clipped
   gradients at the **received global** parameters θ_t (the task's
   :class:`GradientSumSettings` fit; MovieLens: :mod:`fedrlhf_secure.tasks.movielens.gradients`),
   over all of its records (sample rate 1);
2. it adds a noise share (Gaussian N(0, (zC)²/(m-1)) for float aggregators, Skellam of variance
   μ/(m-1) for the integer masking aggregator) and releases ``g_k + share`` through the secure
   aggregator;
3. the server reads ``Σ_k g_k + Σ shares`` (the sum of all clients' clipped gradients plus at least
   N(0, (zC)²) from any m - 1 shares) and applies it with the server optimizer (post-processing,
   :mod:`fedrlhf_secure.federation.server_optimizer`).

One aggregation is one step of a central DP-SGD learner holding every client's records (a round
is ``privacy.steps_per_round`` of them, below). One record
replaced moves one summand of one ``g_k`` by at most 2C, the replace-one sensitivity
(:data:`.accountants.RELATION`) the client-level mechanism also has, so the noise, its
calibration over ``federation.rounds × steps_per_round`` releases, the survivors rule (:func:`.client_level.survivors_required`),
the m - 1 share divisor (:func:`.client_level.share_divisor`) and the Skellam sizing are those of
:class:`.client_level.ClientLevelPlan`, which this plan reuses; only what is clipped differs (each
record to C inside the task instead of the whole update) and what is released (a gradient sum, not
a trained delta).

**Soundness: one step per aggregation.** Only a noised sum computed at public parameters may leave
a client. A client that took several local steps with only its noise *share* would release a
trajectory in which one record's influence is carried through every later step (its sensitivity is
unbounded), so each DP-SGD step is one aggregation and ``federation.local_epochs`` is not used.
``privacy.steps_per_round: S`` (default 1) makes one round S such steps: the round core
(:meth:`fedrlhf_secure.federation.round_core.RoundCore.run_round`) runs S complete aggregations
(each its own protocol round ``t = r·S + s`` with a fresh secure-aggregation session), and the
server optimizer applies step s's noised sum before the clients compute step s + 1's gradients at
the new public model. Evaluation, metrics and the run's checkpoint granularity stay per round
(the checkpoint is also written after every step, so a crash mid-round resumes at the next step
with the ledger's spend intact). The plan is calibrated and accounted over
``federation.rounds × S`` releases (:func:`releases_per_run`); every step is a ledger entry.
Personal parameters (the user embedding) stay on the client and are never in the released
gradient (the task evaluates it at the public initial user embedding).

**No sampling amplification** is claimed (sample rate 1, full batch): the Skellam accountant
(:class:`.accountants.SkellamAccountant`) has none, and with ~80,000 records summed the noise σC
is already small against the gradient sum, so the cost is in ε, not in accuracy.

**Where the noise is added, and whom it protects** (refused combinations exit 2 in
:mod:`.factory`):

* ``distributed`` under ``aggregation: secagg`` (integer masking: Skellam shares) or ``ckks``
  (Gaussian shares): the server learns only the noised sum; a participant that reads the aggregate
  subtracts its own share and is left with the other m - 1, which carry the full noise.
* ``distributed`` under ``aggregation: plain`` is **refused**: the server would read each client's
  ``g_k + share`` with a share of only zC/√(m-1) (for 943 clients a 31st of the noise), i.e.
  essentially the client's un-noised gradient sum.
* ``central`` (plain or secagg: aggregators whose server reads the result): clients send ``g_k``
  un-noised and the server adds N(0, (zC)²) to the sum (:mod:`.server`). The trust assumption is
  the central-DP one: the **server is trusted** (with plain aggregation it sees every client's
  exact clipped gradient sum; with secagg it sees the exact sum); only the released models and
  everyone downstream of them are protected. A deployment node refuses it (:mod:`.participant`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .client_level import ClientLevelPlan, IntegerDomain
from .dpsgd import DPSGDReport, DPSGDSettings
from .ledger import LedgerEntry, PrivacyLedger
from .noise import NoiseSource
from .plan import Release
from .replay import ReleaseStore

RECORD_NOISE = ("local", "distributed", "central")
"""``privacy.record_noise``: ``local`` is per-client Opacus DP-SGD (:mod:`.record_level`)."""


@dataclass(frozen=True)
class GradientSumSettings(DPSGDSettings):
    """Tells a task's fit to return ``Σ_i clip_C(∇ℓ_i)`` over all its records at the received
    parameters as its delta (negated: the descent direction), one "step", no noise: the privacy
    plan adds the noise share. ``noise_multiplier`` is the central z the shares add up to (for the
    task's report only); ``sample_rate`` is 1. ``fit_personal``: refit the client's own prediction
    embedding (never released) to the received model after the sum is computed; with several steps
    per round only the round's last step asks for it (the evaluation after the round uses it)."""

    fit_personal: bool = True


def steps_per_round(config: Any) -> int:
    """``privacy.steps_per_round`` (1 unless distributed/central record-level DP)."""
    return int(getattr(config.privacy, "steps_per_round", 1))


def releases_per_run(config: Any) -> int:
    """How many releases a client makes over the whole run: ``federation.rounds × steps_per_round``.
    Every noise calibration of the run (the clients' shares, the server's central noise, the Skellam
    headroom) is over this many compositions."""
    return int(config.federation.rounds) * steps_per_round(config)


class DistributedRecordPlan(ClientLevelPlan):
    """Record-level DP with distributed (or central) noise on per-record clipped gradient sums."""

    mode = "record"

    def __init__(
        self,
        *,
        rounds: int,
        max_grad_norm: float,
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
        steps_per_round: int = 1,
    ) -> None:
        self.steps_per_round = int(steps_per_round)
        super().__init__(
            rounds=int(rounds) * self.steps_per_round,  # every step is a release: calibrate over all of them
            clip_norm=max_grad_norm,
            noise=noise,
            budget=budget,
            delta=delta,
            accountant=accountant,
            noise_multiplier=noise_multiplier,
            survivor_fraction=survivor_fraction,
            min_clients=min_clients,
            integer=integer,
            ledger=ledger,
            releases=releases,
            noise_source=noise_source,
        )

    def dpsgd_settings(self, client_id: int, round: int) -> GradientSumSettings:
        last_step = (int(round) + 1) % self.steps_per_round == 0
        return GradientSumSettings(noise_multiplier=float(self.z), max_grad_norm=self.clip_norm, sample_rate=1.0, fit_personal=last_step)

    def clip(self, vector: np.ndarray) -> np.ndarray:
        """No whole-update clip: each record was clipped to C inside the task (checked in
        :meth:`entry_for` against the task's report), which bounds one record's effect on the sum by 2C."""
        return np.asarray(vector, dtype=np.float32)

    def add_noise(self, client_id: int, round: int, clipped: np.ndarray, weight: float) -> Release:
        if not np.all(np.isfinite(clipped)):
            from .budget import PrivacyViolation

            raise PrivacyViolation(f"client {client_id} round {round}: the gradient sum is not finite")
        return super().add_noise(client_id, round, clipped, weight)

    def entry_for(self, client_id: int, round: int, report: DPSGDReport | None, digest: str) -> LedgerEntry:
        from .budget import PrivacyViolation

        if report is None:
            raise PrivacyViolation(
                f"client {client_id} round {round}: the task reported no gradient sum (FitResult.dp_sgd is None); "
                "privacy.record_noise distributed/central needs a task that supports GradientSumSettings"
            )
        if report.max_grad_norm > self.clip_norm or report.sample_rate != 1.0 or int(report.steps) != 1:
            raise PrivacyViolation(
                f"client {client_id} round {round}: computed its gradient sum with clip {report.max_grad_norm}, sample rate "
                f"{report.sample_rate}, {report.steps} steps; planned clip {self.clip_norm}, rate 1, one step"
            )
        entry = super().entry_for(client_id, round, report, digest)
        # the mechanism is the Gaussian (Skellam) one of the client level, so ``fedrlhf ledger``
        # recomputes ε from these entries unchanged; the params say it was a per-record clipped sum
        params: dict[str, Any] = {**entry.params, "gradient_sum": 1.0, "per_record_clip": float(self.clip_norm)}
        return replace(entry, params=params)


def effective_noise_std(z: float, clip: float, survivors: int, shares_known: int) -> float:
    """The noise std left in the sum of ``survivors`` Gaussian shares, each sized for
    :func:`.client_level.share_divisor` (m - 1), after an observer subtracts ``shares_known`` of
    them (a curious participant knows its own: 1). At m survivors and one known share it is exactly
    zC; a plan that sized shares for m (the bug the m - 1 rule fixes) leaves zC·√((m-1)/m)."""
    from .client_level import share_divisor

    per_share = (z * clip) ** 2 / share_divisor(survivors)
    return math.sqrt(per_share * max(0, survivors - shares_known))
