"""Record-level DP: DP-SGD inside each client's local training, accounted over the whole run.

The per-sample work is done by the project's engine (:mod:`.per_sample`) or by Opacus
(:func:`.dpsgd.make_private`), ``privacy.per_sample``; both sample, clip, noise and count steps the
same way, so nothing below depends on which.

**Relation: one rating replaced** (replace-one, :data:`.accountants.RELATION`). A client's record
count n_k is not hidden: its FedAvg weight (``weighting: examples``), its sample rate and its step
count are functions of n_k, so the guarantee is about the *content* of one record, with n_k
public, and σ is calibrated and ε accounted under replace-one (main's σ, calibrated for an
add/remove-one ε = 8, really cost 11.4-13.0 on the silos preset under replace-one; docs/dp.md has the
table; at the same ε the replace-one σ is 1.22-1.44× larger there).

Each client k with n_k records trains with Poisson sampling at rate q_k = 1 / b_k, where
b_k = ceil(n_k / batch_size) is its number of batches per epoch. Opacus' ``DPDataLoader`` takes
``int(1/q_k)`` steps per epoch, and in floating point ``int(1 / (1 / b))`` is ``b - 1`` for some b
(93, 99, 105, 117, 123, 186, 198, ...): the plan counts exactly the steps Opacus takes,
``steps_per_epoch = int(1/q_k)``, so the steps calibrated for, the steps taken and the steps the
ledger records are one number. A run plans ``rounds × local_epochs × steps_per_epoch`` steps; the
noise multiplier σ_k is calibrated once so that all of them together cost at most the budget ε
(Abadi et al. 2016 with the accountant chosen by ``privacy.accountant``). Clients with the same b_k
share one calibration.

Client sampling (``federation.fraction``) is not used for amplification: the server knows whom it
selected, so each client's ε is the composition of the rounds it actually took part in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from .accountants import GaussianAccountant, GaussianRelease
from .budget import BudgetedPlan, PrivacyViolation
from .calibration import gaussian_noise_multiplier
from .dpsgd import DPSGDReport, DPSGDSettings
from .ledger import LedgerEntry, PrivacyLedger
from .noise import NoiseSource
from .plan import Release
from .replay import ReleaseStore


def steps_per_epoch(batches: int) -> int:
    """The steps Opacus' ``DPDataLoader`` takes per epoch at q = 1/batches: ``int(1/q)``, which is
    ``batches - 1`` when ``1/(1/batches)`` rounds below ``batches`` (b = 93, 99, 105, ...)."""
    return max(1, int(1.0 / (1.0 / batches)))


class RecordLevelPlan(BudgetedPlan):
    mode = "record"

    def __init__(
        self,
        *,
        client_sizes: Mapping[int, int],
        rounds: int,
        local_epochs: int,
        batch_size: int,
        max_grad_norm: float,
        budget: float | None,
        delta: float,
        accountant: str,
        noise_multiplier: float | None,
        ledger: PrivacyLedger,
        releases: ReleaseStore,
        noise: NoiseSource,
        per_sample: str = "direct",
    ) -> None:
        super().__init__(budget=budget, delta=delta, ledger=ledger, releases=releases, noise=noise)
        self.accountant = GaussianAccountant(accountant)
        self.max_grad_norm = float(max_grad_norm)
        self.local_epochs = int(local_epochs)
        self.per_sample = per_sample
        self.batches = {c: max(1, math.ceil(n / batch_size)) for c, n in client_sizes.items()}
        self._sigma: dict[int, float] = {}
        buckets = sorted(set(self.batches.values()))
        from .. import progress

        calibrating = progress.bar(
            len(buckets), "calibrating DP-SGD noise", "sample rate", show=noise_multiplier is None and len(buckets) >= 4, leave=False
        )
        for b in buckets:
            calibrating.update(1)
            if noise_multiplier is not None:
                self._sigma[b] = float(noise_multiplier)
            else:
                assert budget is not None
                steps = rounds * local_epochs * steps_per_epoch(b)
                self._sigma[b] = gaussian_noise_multiplier(self.accountant, budget, delta, 1.0 / b, steps)
        calibrating.close()

    def sample_rate(self, client_id: int) -> float:
        return 1.0 / self.batches[client_id]

    def noise_multiplier(self, client_id: int) -> float:
        return self._sigma[self.batches[client_id]]

    def steps_per_round(self, client_id: int) -> int:
        return self.local_epochs * steps_per_epoch(self.batches[client_id])

    # ------------------------------------------------------------------ BudgetedPlan
    def history_of(self, entries: Sequence[LedgerEntry]) -> list[GaussianRelease]:
        return [GaussianRelease(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]

    def history_epsilon(self, history: Sequence[GaussianRelease]) -> float:
        return self.accountant.epsilon(history, self.delta)

    def next_history(self, client_id: int) -> list[GaussianRelease]:
        planned = GaussianRelease(self.noise_multiplier(client_id), self.sample_rate(client_id), self.steps_per_round(client_id))
        return [*self.history_of(self.ledger.entries(client_id)), planned]

    def dpsgd_settings(self, client_id: int, round: int) -> DPSGDSettings:
        sigma = self.noise.dpsgd_noise_multiplier(self.noise_multiplier(client_id))
        return DPSGDSettings(
            noise_multiplier=sigma, max_grad_norm=self.max_grad_norm, sample_rate=self.sample_rate(client_id), per_sample=self.per_sample
        )

    def add_noise(self, client_id: int, round: int, clipped, weight: float) -> Release:
        """Record level: the noise was added inside DP-SGD; the update leaves as trained."""
        return Release(clipped, weight)

    def entry_for(self, client_id: int, round: int, report: DPSGDReport | None, digest: str) -> LedgerEntry:
        if report is None:
            raise PrivacyViolation(
                f"client {client_id} round {round}: the task reported no DP-SGD (FitResult.dp_sgd is None); "
                "record-level DP needs a task that trains with the given DPSGDSettings"
            )
        sigma, q, steps = self.noise_multiplier(client_id), self.sample_rate(client_id), int(report.steps)
        handed_out = self.noise.dpsgd_noise_multiplier(sigma)
        if report.noise_multiplier < handed_out:
            raise PrivacyViolation(
                f"client {client_id} round {round}: trained with noise multiplier {report.noise_multiplier} < planned {sigma}"
            )
        if abs(report.sample_rate - q) > 1e-12 or report.max_grad_norm > self.max_grad_norm:
            raise PrivacyViolation(
                f"client {client_id} round {round}: trained with sample rate {report.sample_rate} / clip {report.max_grad_norm}, "
                f"planned {q} / {self.max_grad_norm}"
            )
        if steps > self.steps_per_round(client_id):
            raise PrivacyViolation(
                f"client {client_id} round {round}: took {steps} DP-SGD steps, planned at most {self.steps_per_round(client_id)}"
            )
        return LedgerEntry(
            client=client_id,
            round=round,
            mechanism="dp-sgd",
            noise_multiplier=sigma,
            sample_rate=q,
            steps=steps,
            sensitivity=self.max_grad_norm,
            epsilon_after=math.nan,
            delta=self.delta,
            digest=digest,
            noise="local",
        )
