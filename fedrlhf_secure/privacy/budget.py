"""What every DP plan shares: budget checks, ledger commits, crash replay and the summary.

A concrete plan (record level :mod:`.record_level`, client level :mod:`.client_level`) says what
one round of a client costs and how an update is privatized; this base class turns that into the
engine's :class:`~.plan.PrivacyPlan` calls:

* ``admit``: refuse a client whose next planned release would take its ε over the budget;
* ``privatize``: replay the stored release if this (client, round) was already released before a
  crash (:mod:`.replay`), else privatize afresh;
* ``commit``: check what the client actually did against the plan, compute ε after it, refuse
  (raise :class:`BudgetExceeded`) if that breaks the budget, store the release for replay, then
  write the ledger entry — all before the update leaves the client.
"""

from __future__ import annotations

import math
import sys
from abc import abstractmethod
from typing import Any, Sequence

import numpy as np

from .ledger import LedgerEntry, PrivacyLedger
from .plan import PrivacyPlan, Privatized
from .replay import ReleaseStore, release_digest

EPS_SLACK = 1e-9


class BudgetExceeded(RuntimeError):
    """A release would take a client's ε over its budget; the update must not leave the client."""


class PrivacyViolation(RuntimeError):
    """A client's local training did not do what the plan required (e.g. fewer noise, more steps)."""


class BudgetedPlan(PrivacyPlan):
    mode: str

    def __init__(self, *, budget: float | None, delta: float, ledger: PrivacyLedger, releases: ReleaseStore, accountant_name: str) -> None:
        self.budget = math.inf if budget is None else float(budget)
        self.delta = float(delta)
        self.ledger = ledger
        self.releases = releases
        self.accountant_name = accountant_name
        self._pending: dict[tuple[int, int], Privatized] = {}
        self.refusals: dict[int, list[int]] = {}
        self.admitted: dict[int, set[int]] = {}

    # ------------------------------------------------------------------ what a concrete plan says
    @abstractmethod
    def next_history(self, client_id: int) -> Sequence[Any]:
        """The client's ledger history plus one more planned round, as accountant releases."""

    @abstractmethod
    def history_epsilon(self, history: Sequence[Any]) -> float: ...

    @abstractmethod
    def entry_for(self, client_id: int, round: int, fit_privacy: dict[str, Any], digest: str) -> LedgerEntry:
        """The ledger entry of this release (``epsilon_after`` filled by :meth:`commit`); raises
        :class:`PrivacyViolation` if the client's fit departs from the plan."""

    @abstractmethod
    def history_of(self, entries: Sequence[LedgerEntry]) -> list[Any]: ...

    def fresh_privatize(self, client_id: int, round: int, vector: np.ndarray, weight: float) -> Privatized:
        return Privatized(vector, weight)

    # ------------------------------------------------------------------ PrivacyPlan
    def admit(self, client_id: int, round: int) -> bool:
        if self.ledger.entry(client_id, round) is not None:
            self.admitted.setdefault(round, set()).add(client_id)
            return True  # already paid for; re-running the round replays the same release
        eps_next = self.history_epsilon(self.next_history(client_id))
        if eps_next > self.budget + EPS_SLACK:
            self.refusals.setdefault(client_id, []).append(round)
            print(
                f"privacy: client {client_id} sits out round {round}: its ε would reach {eps_next:.3f} "
                f"> budget {self.budget:g} (spent {self.ledger.spent(client_id):.3f}, δ={self.delta:g})",
                file=sys.stderr,
            )
            return False
        self.admitted.setdefault(round, set()).add(client_id)
        return True

    def privatize(self, client_id: int, round: int, vector: np.ndarray, weight: float) -> Privatized:
        """A replayed release when this round was already privatized (crash-resume), else a fresh one
        whose noise comes from :mod:`.randomness` (never from the run seed)."""
        priv = self.releases.load(client_id, round)
        if priv is None:
            priv = self.fresh_privatize(client_id, round, np.asarray(vector, dtype=np.float32), float(weight))
        self._pending[(client_id, round)] = priv
        return priv

    def commit(self, client_id: int, round: int, fit_privacy: dict[str, Any]) -> float | None:
        priv = self._pending.pop((client_id, round), None)
        if priv is None:
            raise RuntimeError(f"commit for client {client_id} round {round} without privatize")
        digest = release_digest(client_id, round, priv)
        existing = self.ledger.entry(client_id, round)
        if existing is not None and existing.digest == digest:
            return existing.epsilon_after
        entry = self.entry_for(client_id, round, fit_privacy or {}, digest)
        earlier = [e for e in self.ledger.entries(client_id) if e.round != round]
        eps = self.history_epsilon(self.history_of([*earlier, entry]))
        if eps > self.budget + EPS_SLACK:
            raise BudgetExceeded(
                f"client {client_id} round {round}: this release would take ε to {eps:.3f} > budget {self.budget:g}; not sent"
            )
        entry = LedgerEntry(**{**entry.__dict__, "epsilon_after": eps})
        self.releases.save(client_id, round, priv)
        self.ledger.record(entry)
        return eps

    # ------------------------------------------------------------------ reporting
    def summary(self) -> dict[str, Any]:
        spent = {c: self.ledger.spent(c) for c in self.ledger.clients()}
        values = list(spent.values())
        last_round = max((e.round for e in self.ledger), default=None)
        increments = []
        for c in spent:
            es = self.ledger.entries(c)
            if es and es[-1].round == last_round:
                increments.append(es[-1].epsilon_after - (es[-2].epsilon_after if len(es) > 1 else 0.0))
        return {
            "mode": self.mode,
            "accountant": self.accountant_name,
            "epsilon_budget": None if math.isinf(self.budget) else self.budget,
            "delta": self.delta,
            "epsilon_spent_max": max(values) if values else 0.0,
            "epsilon_spent_mean": float(np.mean(values)) if values else 0.0,
            "epsilon_last_round_max": max(increments, default=0.0),
            "clients_with_releases": len(values),
            "releases": sum(len(self.ledger.entries(c)) for c in spent),
            "last_round": last_round,
            "clients_refused": len(self.refusals),
            "epsilon_per_client": {str(c): v for c, v in sorted(spent.items())},
        }
