"""The server's half of the privacy plan: what the aggregator's side may do, and nothing it may not.

The server holds no ledger and sizes no client's noise (both are the client's half,
:mod:`.plan`). It knows the public configuration, so it can

* add the noise of ``privacy.noise: central`` (client-level DP-FedAvg, McMahan et al. 2018) to the
  aggregate it reads: N(0, (z·C)²) on the sum;
* discard an aggregate with fewer contributors than the clients' distributed noise shares were
  sized for (:func:`.client_level.survivors_required`, the same rule the clients use);
* with adaptive clipping (:mod:`.adaptive_clipping`), keep the released noised counts and the
  clip norm C_t they imply, which it broadcasts (as the counts) with each fit request;
* pool the ε each client's own half reports (plaintext metadata, which it cannot check) into the
  run's metrics and summary.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from aggregation.base import AggregateResult, AggregationAborted, Aggregator

from ..configtypes import ConfigError
from .accountants import RELATION
from .adaptive_clipping import ClipSchedule, CountRelease
from .client_level import accountant_name, dp_fedavg_noise_multiplier, survivors_required
from .distributed_dpsgd import releases_per_run, steps_per_round
from .noise import NoiseSource


def central_noise_unreadable(config: Any, aggregator: Aggregator) -> ConfigError:
    """``noise: central`` is added by whoever reads the aggregate; under an aggregator only the clients
    can read (CKKS) nobody would add it while the ledger charged for it."""
    return ConfigError(
        f"'central' noise is added to the aggregate by the server, but the {aggregator.kind} aggregator keeps the aggregate "
        "from the server; use privacy.noise: distributed (each client adds its share before encrypting)",
        source=config.source,
        key="privacy.noise",
    )


class ServerPrivacy:
    def __init__(self, config: Any, noise: NoiseSource | None = None, aggregator: Aggregator | None = None) -> None:
        p = config.privacy
        self.mode = p.mode
        self.noise = noise or NoiseSource()
        self.min_clients = int(config.federation.min_clients)
        self.survivor_fraction = float(getattr(p, "survivor_fraction", 1.0))
        record_noise = getattr(p, "record_noise", "local") if p.mode == "record" else None
        self.distributed = (p.mode == "client" and p.noise == "distributed") or record_noise == "distributed"
        self.central_std = 0.0
        self.schedule: ClipSchedule | None = None
        self.public: dict[str, Any] = {}
        if p.mode != "none":
            integer = aggregator is not None and aggregator.capabilities.integer_scale is not None
            accountant = accountant_name(p.accountant, self.distributed and integer)
            self.public = {"accountant": accountant, "relation": RELATION, "epsilon_budget": p.epsilon, "delta": p.delta}
        if p.mode == "client":
            z = dp_fedavg_noise_multiplier(p.accountant, p.epsilon, p.delta, config.federation.rounds, p.noise_multiplier)
            self.public.update(noise=p.noise, clip_norm=p.clip_norm, noise_multiplier=float(z))
            if p.adaptive_clip is not None:
                try:
                    self.schedule = ClipSchedule(p.clip_norm, p.adaptive_clip, z)
                except ValueError as exc:  # count_noise <= z/2: the count alone would spend the budget
                    raise ConfigError(str(exc), source=config.source, key="privacy.adaptive_clip.count_noise") from exc
                self.public.update(update_noise_multiplier=self.schedule.z_update, count_noise=p.adaptive_clip.count_noise)
            if p.noise == "central":
                if aggregator is not None and not aggregator.capabilities.server_reads_result:
                    raise central_noise_unreadable(config, aggregator)
                self.central_std = float(z) * float(p.clip_norm)
        elif p.mode == "record":
            self.public.update(max_grad_norm=p.max_grad_norm)
            if record_noise != "local":  # one DP-SGD step per round on the clients' summed clipped gradients (.distributed_dpsgd)
                # calibrated over every step's release: rounds × privacy.steps_per_round
                z = dp_fedavg_noise_multiplier(p.accountant, p.epsilon, p.delta, releases_per_run(config), p.noise_multiplier)
                self.public.update(record_noise=record_noise, noise_multiplier=float(z), steps_per_round=steps_per_round(config))
                if record_noise == "central":
                    if aggregator is not None and not aggregator.capabilities.server_reads_result:
                        raise central_noise_unreadable(config, aggregator)
                    self.central_std = float(z) * float(p.max_grad_norm)
        self.spent: dict[int, float] = {}
        self.refused: set[int] = set()

    def survivors_required(self, admitted: int) -> int:
        """Contributors the clients' distributed noise was sized for (0 without distributed noise)."""
        return survivors_required(admitted, self.min_clients, self.survivor_fraction) if self.distributed else 0

    def check_contributors(self, round: int, contributors: tuple[int, ...], admitted: int) -> None:
        """Discard an aggregate of fewer contributors than the distributed noise was sized for. Under
        CKKS the hosts that decrypt it check the same rule before they apply it."""
        need = self.survivors_required(admitted)
        if len(contributors) < need:
            raise AggregationAborted(
                f"round {round}: {len(contributors)} contributors survived but the distributed noise shares were sized "
                f"for {need} (privacy.survivor_fraction); the aggregate is discarded"
            )

    def finalize(self, round: int, result: AggregateResult, admitted: int) -> AggregateResult:
        """The aggregate the round may apply: central noise added, or discarded below the survivors."""
        self.check_contributors(round, result.contributors, admitted)
        if self.central_std:
            std = self.central_std
            if self.schedule is not None:  # z·C_aug of this round: z_Δ·C_t on the update, σ_b on the count slot
                std = self.central_std * self.schedule.augmented_clip(self.schedule.clip_for(round)) / self.schedule.initial
            noisy = np.asarray(result.weighted_sum, dtype=np.float64) + self.noise.gaussian(std, np.shape(result.weighted_sum))
            return AggregateResult(noisy, result.total_weight, result.contributors)
        return result

    def observe_count(self, round: int, total: float, contributors: int) -> None:
        """A released (noised) aggregate's count slot: the next rounds' C follows from it."""
        if self.schedule is not None:
            self.schedule.observe(CountRelease(int(round), float(total), int(contributors)))

    def count_history(self) -> list[list[float | int]]:
        """What the fit requests carry: the released counts so far (empty without adaptive clipping)."""
        return [] if self.schedule is None else self.schedule.history()

    def report(self, client_id: int, epsilon: Any) -> None:
        """A client's ε spent, as its own half reports it (ignored unless a finite non-negative number)."""
        if self.mode == "none" or isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)):
            return
        if math.isfinite(epsilon) and epsilon >= 0:
            self.spent[client_id] = float(epsilon)

    def refuse(self, client_id: int) -> None:
        self.refused.add(client_id)

    def summary(self) -> dict[str, Any]:
        if self.mode == "none":
            return {"mode": "none", "epsilon_spent_max": None}
        values = list(self.spent.values())
        adaptive: dict[str, Any] = {}
        if self.schedule is not None:
            last = self.schedule.releases[-1].round + 1 if self.schedule.releases else 0
            adaptive = {
                "clip_norm_next": self.schedule.clip_for(last),
                "clip_norms": [self.schedule.clip_for(r) for r in range(last + 1)],
                "fraction_under_clip": [self.schedule.fraction(rel, self.schedule.clip_for(rel.round)) for rel in self.schedule.releases],
            }
        return {
            "mode": self.mode,
            "reported_by": "clients",
            **self.public,
            "epsilon_spent_max": max(values) if values else 0.0,
            "epsilon_spent_mean": float(np.mean(values)) if values else 0.0,
            "clients_with_releases": sum(1 for v in values if v > 0),
            "clients_refused": len(self.refused),
            "epsilon_per_client": {str(c): v for c, v in sorted(self.spent.items())},
            **adaptive,
        }
