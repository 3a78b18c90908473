"""The engine's one door into differential privacy.

The engine asks a :class:`PrivacyPlan` four things, and nothing else computes or stores ε:

* ``admit(client_id, round)``: may this client take part in this round without exceeding its
  budget? (a refusal is reported and the client sits out);
* ``fit_settings(client_id, round, num_examples)``: record-level DP-SGD settings for the task, or None;
* ``privatize(client_id, round, vector, weight)``: client-level clipping and the client's
  noise share (drawn from :mod:`.randomness`, never from a caller's seeded generator), applied to the flat update *before* it enters the aggregator;
* ``commit(client_id, round, fit_privacy)``: write the release to the ledger (atomic, fsync'd)
  *before* the update leaves the client; returns the ε spent so far by that client.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aggregation.base import AggregateResult

from .dpsgd import DPSGDSettings


@dataclass
class Privatized:
    """A client's update after client-level DP, ready for the aggregator.

    ``aggregator_kwargs`` are passed to ``Aggregator.client(...)``: distributed discrete noise for
    the masking mode travels as ``integer_noise`` (added after quantisation, before masking).
    """

    vector: np.ndarray
    weight: float
    aggregator_kwargs: dict[str, Any] = field(default_factory=dict)


class PrivacyPlan(ABC):
    @abstractmethod
    def admit(self, client_id: int, round: int) -> bool: ...

    @abstractmethod
    def fit_settings(self, client_id: int, round: int, num_examples: int) -> DPSGDSettings | None: ...

    @abstractmethod
    def privatize(self, client_id: int, round: int, vector: np.ndarray, weight: float) -> Privatized: ...

    @abstractmethod
    def commit(self, client_id: int, round: int, fit_privacy: dict[str, Any]) -> float | None: ...

    def finalize_aggregate(self, round: int, result: AggregateResult) -> AggregateResult:
        """Server-side step after aggregation (``noise: central`` adds its noise here); default: none."""
        return result

    @abstractmethod
    def summary(self) -> dict[str, Any]:
        """ε spent per client and in total (for metrics.jsonl / summary.json)."""


class NoPrivacy(PrivacyPlan):
    """``privacy.mode: none``: every client is admitted, updates pass through unchanged."""

    def admit(self, client_id: int, round: int) -> bool:
        return True

    def fit_settings(self, client_id: int, round: int, num_examples: int) -> DPSGDSettings | None:
        return None

    def privatize(self, client_id, round, vector, weight) -> Privatized:
        return Privatized(vector, weight)

    def commit(self, client_id: int, round: int, fit_privacy: dict[str, Any]) -> float | None:
        return None

    def summary(self) -> dict[str, Any]:
        return {"mode": "none", "epsilon_spent_max": None}
