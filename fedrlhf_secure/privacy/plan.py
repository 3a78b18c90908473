"""The client's half of the privacy plan: what runs where the client's data is, before any byte leaves.

A :class:`ClientPrivacy` lives beside the clients it protects (the in-process participant host, or a
deployment node) and keeps their ledger. A :class:`~fedrlhf_secure.federation.participant.Participant`
calls it in this order for each release, and nothing else computes or stores ε:

* ``admit(client, round)``: may this client take part without exceeding its budget?
* ``dpsgd_settings(client, round)``: record-level DP-SGD settings for the task's local training, or None;
* ``replayed(client, round)``: the release stored before a crash, to send again unchanged;
* ``clip(vector)`` then ``add_noise(...)``: client-level clipping and the client's noise share
  (drawn from the injected :class:`~.noise.NoiseSource`, never from a caller's seeded generator);
* ``commit(client, round, release, report)``: write the release to the ledger (atomic, fsync'd)
  *before* the update leaves the client; returns the ε the client has spent so far.

The server's half (:mod:`.server`) never sees a ledger: it sizes nothing, adds central noise when
configured, discards an aggregate with too few survivors, and pools the ε the clients report.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .dpsgd import DPSGDReport, DPSGDSettings


@dataclass(frozen=True)
class Release:
    """A client's update after its privacy layer, ready for the aggregator's client half.

    ``integer_noise`` is the distributed discrete (Skellam) noise share for an aggregator that takes
    integer inputs (masking): it is added after quantisation and before masking, so only the noisy
    sum is ever unmasked.
    """

    vector: np.ndarray
    weight: float
    integer_noise: np.ndarray | None = None


class ClientPrivacy(ABC):
    mode: str = "none"
    canaries = None
    """Audit canaries (``privacy.audit_canaries``; :class:`~.canaries.GradientCanaries`), set by the host."""

    def insert_canaries(self, client_id: int, round: int, clipped: np.ndarray) -> np.ndarray:
        """After clipping, before the noise: this client's kept audit canaries (identity without any)."""
        return clipped if self.canaries is None else self.canaries.insert(client_id, round, clipped)

    def begin_round(self, round: int, participants: int) -> None:  # noqa: B027  (an optional hook: most plans need no per-round facts)
        """The round's public facts before any release: how many clients take part federation-wide
        (the distributed noise is sized for the survivors that count implies)."""

    def observe_counts(self, round: int, history: Sequence[Any]) -> None:
        """The released clipped counts of earlier rounds (adaptive clipping, :mod:`.adaptive_clipping`).
        A plan without adaptive clipping takes none: a server sending some is refused."""
        if history:
            raise ValueError(f"round {round}: released clip counts sent, but this run's privacy plan does not adapt its clip norm")

    @abstractmethod
    def admit(self, client_id: int, round: int) -> bool: ...

    @abstractmethod
    def dpsgd_settings(self, client_id: int, round: int) -> DPSGDSettings | None: ...

    def replayed(self, client_id: int, round: int) -> Release | None:
        """The release this client already made in this round before a crash, if any."""
        return None

    def clip(self, vector: np.ndarray) -> np.ndarray:
        """Client-level clipping (identity unless the plan bounds the whole update)."""
        return vector

    @abstractmethod
    def add_noise(self, client_id: int, round: int, clipped: np.ndarray, weight: float) -> Release:
        """The client's noise share for this release."""

    @abstractmethod
    def commit(self, client_id: int, round: int, release: Release, report: DPSGDReport | None) -> float | None: ...

    def minimum_contributors(self, round: int) -> int:
        """The fewest contributors an aggregate of this round may combine before this client may use it
        (the survivors its distributed noise share was sized for; 0 when nothing depends on it). A
        host that decrypts the aggregate itself (CKKS) checks it before applying."""
        return 0

    def spent(self, client_id: int) -> float | None:
        """ε this client has spent so far (None without DP)."""
        return None


class NoClientPrivacy(ClientPrivacy):
    """``privacy.mode: none``: every client is admitted, updates pass through unchanged."""

    def admit(self, client_id: int, round: int) -> bool:
        return True

    def dpsgd_settings(self, client_id: int, round: int) -> DPSGDSettings | None:
        return None

    def add_noise(self, client_id, round, clipped, weight) -> Release:
        return Release(clipped, weight)

    def commit(self, client_id, round, release, report) -> float | None:
        return None
