"""What every DP plan shares: budget checks, ledger commits and crash replay.

A concrete plan (record level :mod:`.record_level`, client level :mod:`.client_level`) says what
one round of a client costs and how an update is privatized; this base class turns that into the
client half's :class:`~.plan.ClientPrivacy` calls:

* ``admit``: refuse a client whose next planned release would take its ε over the budget;
* ``replayed``: the stored release if this (client, round) was already released before a crash
  (:mod:`.replay`), so a resumed round sends exactly what it sent (and paid for) before;
* ``commit``: check what the client actually did against the plan, compute ε after it, refuse
  (raise :class:`BudgetExceeded`) if that breaks the budget, store the release for replay, then
  write the ledger entry — all before the update leaves the client.
"""

from __future__ import annotations

import logging
import math
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

from ..errors import PrivacyError
from .dpsgd import DPSGDReport
from .ledger import LedgerEntry, PrivacyLedger
from .noise import NoiseSource
from .plan import ClientPrivacy, Release
from .replay import ReleaseStore, release_digest

EPS_SLACK = 1e-9
logger = logging.getLogger(__name__)


class BudgetExceeded(PrivacyError):
    """A release would take a client's ε over its budget; the update must not leave the client."""


class PrivacyViolation(PrivacyError):
    """A client's local training did not do what the plan required (e.g. fewer noise, more steps)."""


class BudgetedPlan(ClientPrivacy):
    mode: str

    def __init__(self, *, budget: float | None, delta: float, ledger: PrivacyLedger, releases: ReleaseStore, noise: NoiseSource) -> None:
        self.budget = math.inf if budget is None else float(budget)
        self.delta = float(delta)
        self.ledger = ledger
        self.releases = releases
        self.noise = noise
        self.admitted: dict[int, set[int]] = {}

    # ------------------------------------------------------------------ what a concrete plan says
    @abstractmethod
    def next_history(self, client_id: int) -> Sequence[Any]:
        """The client's ledger history plus one more planned round, as accountant releases."""

    @abstractmethod
    def history_epsilon(self, history: Sequence[Any]) -> float: ...

    @abstractmethod
    def entry_for(self, client_id: int, round: int, report: DPSGDReport | None, digest: str) -> LedgerEntry:
        """The ledger entry of this release (``epsilon_after`` filled by :meth:`commit`); raises
        :class:`PrivacyViolation` if the client's fit departs from the plan."""

    @abstractmethod
    def history_of(self, entries: Sequence[LedgerEntry]) -> list[Any]: ...

    # ------------------------------------------------------------------ ClientPrivacy
    def admit(self, client_id: int, round: int) -> bool:
        if self.ledger.entry(client_id, round) is not None:
            self.admitted.setdefault(round, set()).add(client_id)
            return True  # already paid for; re-running the round replays the same release
        eps_next = self.history_epsilon(self.next_history(client_id))
        if eps_next > self.budget + EPS_SLACK:
            logger.warning(
                "privacy: client %d sits out round %d: its ε would reach %.3f > budget %g (spent %.3f, δ=%g)",
                client_id,
                round,
                eps_next,
                self.budget,
                self.ledger.spent(client_id),
                self.delta,
            )
            return False
        self.admitted.setdefault(round, set()).add(client_id)
        return True

    def replayed(self, client_id: int, round: int) -> Release | None:
        return self.releases.load(client_id, round)

    def commit(self, client_id: int, round: int, release: Release, report: DPSGDReport | None) -> float | None:
        digest = release_digest(client_id, round, release)
        existing = self.ledger.entry(client_id, round)
        if existing is not None and existing.digest == digest:
            return existing.epsilon_after
        entry = self.entry_for(client_id, round, report, digest)
        earlier = [e for e in self.ledger.entries(client_id) if e.round != round]
        eps = self.history_epsilon(self.history_of([*earlier, entry]))
        if eps > self.budget + EPS_SLACK:
            raise BudgetExceeded(
                f"client {client_id} round {round}: this release would take ε to {eps:.3f} > budget {self.budget:g}; not sent"
            )
        entry = LedgerEntry(**{**entry.__dict__, "epsilon_after": eps})
        self.releases.save(client_id, round, release)
        self.ledger.record(entry)
        return eps

    def spent(self, client_id: int) -> float | None:
        return self.ledger.spent(client_id)
