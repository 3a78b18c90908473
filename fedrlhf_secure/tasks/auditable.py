"""What a task provides to the membership-inference audits (:mod:`attacks`).

The audits know no task by name. They need, from a task, only

* a universe of **records** with stable ids (the candidates of the membership game),
* the same federation trained on a **chosen subset** of those records (shadow and canary runs are
  trained by the project's own federation code on tasks the audit prepares),
* a **per-record score** of a released model (LOSS, reference, LiRA and RMIA attack it), and
* **canaries** for the one-run ε lower bound, with a score that tells an included canary from a
  left-out one as well as the task allows.

A task opts in by subclassing :class:`AuditableTask` besides :class:`~fedrlhf_secure.tasks.base.Task`.
:func:`require_auditable` is the one gate the audits go through; a task that does not implement
the interface is refused with :class:`AuditUnsupported` (an
:class:`~fedrlhf_secure.errors.InputError`: ``fedrlhf audit`` exits 2) naming the task kind and
what is missing.

**Records** are rows of an int64 array ``(N, k)``; each row identifies one record and is all the
task needs to find it again (MovieLens: ``(user_id, item_id, rating)``; IMDb:
``(client_id, review_id, label)``). Rows are compared with ``np.array_equal``, so a task must list
them in a fixed order that no subset changes.
"""

from __future__ import annotations

import typing
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError
from .base import Task


class AuditUnsupported(InputError):
    """The run cannot be audited this way (e.g. its task does not implement :class:`AuditableTask`)."""


@dataclass(frozen=True)
class Candidates:
    """The membership game on one federation: ``task`` can train on every candidate record and
    ``member`` (bool, one per row of ``task.training_records()``) marks those the audited run
    trained on. ``task.training_records()[member]`` equals the audited task's ``training_records()``."""

    task: AuditableTask
    member: np.ndarray


@dataclass(frozen=True)
class CanarySet:
    """A task holding ``len(index)`` canaries among its training records, all included.

    ``index`` are the canaries' positions in ``task.training_records()`` and ``records`` their
    rows; the audit flips a fair coin per canary and trains ``task.with_records(keep)``."""

    task: AuditableTask
    records: np.ndarray
    index: np.ndarray


class AuditableTask(ABC):
    """The record-level hooks the membership-inference audits need from a task (see the module docstring)."""

    @abstractmethod
    def training_records(self) -> np.ndarray:
        """(N, k) int64: every training record of the federation's clients, in a fixed order.

        Why: it is the set of members of the audited run, and the universe a shadow or canary run
        draws its training subset from. Records removed by :meth:`with_records` are still listed
        (the order, and so every mask over it, never changes)."""

    @abstractmethod
    def with_records(self, keep: np.ndarray) -> AuditableTask:
        """The same task (same clients, held-out data, feedback and initial parameters) whose clients
        train only on ``training_records()[keep]`` (``keep``: bool, one per record).

        Why: shadow runs train on random halves of the candidates and canary runs leave out half of
        the canaries; a record outside ``keep`` must never reach any client's training set."""

    @abstractmethod
    def record_scores(
        self, shared: Mapping[str, np.ndarray], records: np.ndarray, personal: Mapping[str, np.ndarray] | None = None
    ) -> np.ndarray:
        """(N,) float: the *logit-scaled confidence* ``z = log(p / (1 - p))`` of the model with
        shared parameters ``shared`` on each record, ``p`` the model's probability of the record's
        truth (the true label's probability for a classifier; for a language model, the geometric
        mean of its token probabilities). Higher = fits the record better.

        Why: every attack on released parameters scores candidates with it. The LOSS attack's loss is
        ``softplus(-z) = -log p``; LiRA fits Gaussians to ``z`` (Carlini et al. 2022, eq. 4); RMIA
        reads ``sigmoid(z) = p`` as ``Pr(x | θ)``. ``personal`` optionally holds a client's personal
        state (:meth:`~fedrlhf_secure.tasks.base.TaskClient.personal_state`) for stronger threat models."""

    @abstractmethod
    def membership_candidates(self) -> Candidates:
        """Members (this task's training records) and non-members from the same distribution (the
        same clients where the task has per-client held-out records), in one task that can train on
        any of them.

        Why: shadow runs must be able to include *every* candidate, non-members too, so that each
        candidate is IN about half of the shadow runs (Carlini et al. 2022, §IV)."""

    @abstractmethod
    def with_canaries(self, num_canaries: int, rng: np.random.Generator) -> CanarySet:
        """This task with ``num_canaries`` extra records (canaries) added to its clients' training
        data, all included; every random choice is drawn from ``rng``.

        Why: the one-run ε audit (Steinke et al. 2023) needs many records, each included with
        probability ½, whose inclusion is as easy to detect as a single record can be in this task.
        Raise :class:`~fedrlhf_secure.errors.InputError` when the task cannot hold that many."""

    @abstractmethod
    def canary_scores(self, released: Mapping[str, np.ndarray], canaries: np.ndarray) -> np.ndarray:
        """(m,) float: per canary, how strongly the released shared parameters show it was trained
        on (higher = more likely included), from public information only (released and initial
        parameters).

        Why: the one-run audit guesses "in" for the highest scores; the better the score separates
        included from left-out canaries, the tighter the ε lower bound."""

    @abstractmethod
    def record_clients(self, records: np.ndarray) -> np.ndarray:
        """(N,) int64: the client that holds each record (-1 when no client of this task does).

        Why: the server-view audit attacks one client's plain update with that client's records."""

    def record_rows(self, records: np.ndarray) -> dict[str, np.ndarray]:
        """For each ``sparse_rows`` shared parameter, the row each record can move (int64, (N,)).

        Why: a plain update tells the server which sparse rows a client touched; a record whose row
        was not touched cannot have been trained on. Tasks without sparse parameters return ``{}``."""
        return {}

    @abstractmethod
    def with_num_clients(self, num_clients: int) -> AuditableTask:
        """The same task reduced to (or built with) ``num_clients`` clients.

        Why: the server-view audit compares one client's plain update with a secure aggregate of
        ``num_clients`` updates, the size the aggregation claim is about."""


def missing_methods(obj: Any) -> list[str]:
    """The :class:`AuditableTask` methods ``obj`` (a task or a task class) does not provide."""
    return sorted(m for m in AuditableTask.__abstractmethods__ if not callable(getattr(obj, m, None)))


def _refusal(kind: str, what: Any) -> AuditUnsupported:
    name = what.__name__ if isinstance(what, type) else type(what).__name__
    missing = missing_methods(what)
    return AuditUnsupported(
        f"task {kind!r} ({name}) does not implement AuditableTask (fedrlhf_secure.tasks.auditable), which "
        f"membership audits need" + (f"; it lacks {', '.join(missing)}" if missing else "")
    )


def require_auditable(task: Task, kind: str) -> AuditableTask:
    """``task`` itself when it implements :class:`AuditableTask`, else :class:`AuditUnsupported`."""
    if isinstance(task, AuditableTask):
        return task
    raise _refusal(kind, task)


def check_auditable_kind(kind: str) -> None:
    """Refuse a task kind before any work when its registered factory declares a task class that
    does not implement :class:`AuditableTask` (factories without a declared class are checked when
    the task is built, by :func:`require_auditable`)."""
    from .base import task_spec

    try:
        factory = task_spec(kind).factory
    except KeyError as exc:
        raise AuditUnsupported(str(exc.args[0])) from None
    declared: Any = factory if isinstance(factory, type) else None
    if declared is None:
        try:
            declared = typing.get_type_hints(factory).get("return")
        except Exception:  # unresolvable annotations: decide once the task is built
            declared = None
    if isinstance(declared, type) and issubclass(declared, Task) and not issubclass(declared, AuditableTask):
        raise _refusal(kind, declared)
