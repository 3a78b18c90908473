"""Training runs for audits: shadow runs on random halves of the candidates, and canary runs.

Every model an audit trains is trained by the project's own federation code
(:func:`fedrlhf_secure.federation.engine.run_federation`) with the audited run's own config —
same clients, rounds, aggregation and privacy plan — on a MovieLens task whose training records
the audit chooses (:class:`~fedrlhf_secure.tasks.movielens.MovieLensTask` built on a modified
split). Only the released global shared parameters of those runs are used, as an outside attacker
would see them.

* **Candidates** of the membership game on a run are the federation users' training records
  (members of the audited run) and their held-out records (non-members). Shadow runs train on
  independent random halves of *all* candidates, so every candidate is IN about half of the
  shadow runs and OUT of the rest (Carlini et al. 2022, §IV), held-out records included.
* **Canaries** (for the one-run ε audit) are ``m`` extra rating records on the ``m`` least-rated
  items, each given to a random federation user and included with probability ½; all ordinary
  ratings of those items are removed from the canary run, so an item's embedding row is moved by
  its canary alone. That is the strongest signal a single record can carry in this model, which
  the one-run audit needs (Steinke et al. 2023, §6: many canaries, each easy to detect).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from fedrlhf_secure.config import RunConfig, load_config
from fedrlhf_secure.configtypes import InputError
from fedrlhf_secure.federation.engine import RunOptions, build_task, resolve_data_dir, run_federation
from fedrlhf_secure.rundir import load_tensors

CANARY_RATINGS = (1.0, 5.0)
"""Canary ratings are drawn from the extremes so the label ("high" = rating ≥ 4) is unambiguous."""


class AuditUnsupported(InputError):
    """The run cannot be audited this way (e.g. a task without record-level audit hooks)."""


def load_run_config(run_dir: Path) -> RunConfig:
    """The resolved config a run directory was trained with (``config.yaml``), read and validated
    by :func:`fedrlhf_secure.config.load_config` like any other config file."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: {path} is missing")
    return load_config(path)


def ensure_supported(config: RunConfig) -> None:
    """Raise :class:`AuditUnsupported` before any work when the run's task has no audit hooks."""
    if config.task.kind != "movielens":
        raise AuditUnsupported(
            f"audits need record-level hooks (training_records/record_scores); task {config.task.kind!r} has none yet"
        )


def _audited_task(config: RunConfig, data_dir: Path | None):
    """The audited run's own task, built by the task's registered factory exactly as ``fedrlhf run``
    built it (same split, clients, feedback profiles and initial parameters)."""
    ensure_supported(config)
    return build_task(config, resolve_data_dir(data_dir))


def _with_training_ratings(task, train):
    """``task`` (same config, catalogue, held-out set and seed) over other training ratings."""
    return type(task)(task.config, replace(task.split, train=train), task.seed)


def _concat(a, b):
    return type(a)(np.r_[a.user, b.user], np.r_[a.item, b.item], np.r_[a.rating, b.rating].astype(np.float32))


@dataclass
class CandidatePool:
    """The membership game on one run: ``records`` (N, 3), ``member`` (N,) bool for the audited run,
    and a task over all candidates from which subset tasks are made."""

    config: RunConfig
    records: np.ndarray
    member: np.ndarray
    task: object

    def subset_task(self, keep: np.ndarray):
        return self.task.with_training_subset(keep)

    def scores(self, shared: dict[str, np.ndarray], records: np.ndarray | None = None) -> np.ndarray:
        """True-label logit of every candidate (or of ``records``) under released ``shared`` params."""
        return np.asarray(self.task.record_scores(shared, self.records if records is None else records), dtype=np.float64)


def candidate_pool(config: RunConfig, data_dir: Path | None) -> CandidatePool:
    """Training records (members) and held-out records (non-members) of the federation's users."""
    audited = _audited_task(config, data_dir)
    members = audited.training_records()
    n_members = len(members)
    task = _with_training_ratings(audited, _concat(audited.split.train, audited.split.test))
    records = task.training_records()
    # The union task lists records of the federation's users in split order: training ones first.
    member = np.zeros(len(records), dtype=bool)
    member[:n_members] = True
    if not np.array_equal(records[:n_members], members):
        raise RuntimeError("candidate pool does not start with the audited run's training records (task record order changed?)")
    return CandidatePool(config, records, member, task)


def train_released(config: RunConfig, task, *, name: str) -> dict[str, np.ndarray]:
    """Run the federation of ``config`` on ``task`` in a scratch directory; return the released params."""
    config = replace(config, baselines=())  # a shadow needs only its released parameters
    with tempfile.TemporaryDirectory(prefix="fedrlhf-audit-") as tmp:
        run = run_federation(config, RunOptions(out=Path(tmp), progress=False, task=task, name=name))
        return load_tensors(run / "model.safetensors")


def shadow_inclusions(num_shadows: int, num_candidates: int, seed: int) -> np.ndarray:
    """(K, N) bool: each candidate IN each shadow run independently with probability ½."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5AD0]))
    return rng.random((num_shadows, num_candidates)) < 0.5


def train_shadows(
    pool: CandidatePool, inclusions: np.ndarray, *, on_done: Callable[[int], None] | None = None
) -> np.ndarray:
    """(K, N) true-label logits of every candidate under each shadow run's released params."""
    out = np.empty(inclusions.shape, dtype=np.float64)
    for k, keep in enumerate(inclusions):
        released = train_released(pool.config, pool.subset_task(keep), name=f"shadow-{k}")
        out[k] = pool.scores(released)
        if on_done:
            on_done(k)
    return out


# ---------------------------------------------------------------------------------------------
# Canary runs (one-run ε audit)
# ---------------------------------------------------------------------------------------------


@dataclass
class CanaryRun:
    records: np.ndarray
    """(m, 3) raw ``(user_id, item_id, rating)`` of the canaries."""
    included: np.ndarray
    scores: np.ndarray
    """Per canary: how far its item's embedding row moved from its public initial value (L2). Only
    the canary can move that row (no other record rates the item), so without noise the score is
    exactly 0 when the canary was left out; DP noise moves every row alike."""


def canary_task(config: RunConfig, data_dir: Path | None, num_canaries: int, seed: int):
    """A task whose training data has no ordinary ratings of ``num_canaries`` least-rated items and
    holds one canary per such item; returns ``(task, canary_records, included)``."""
    from fedrlhf_secure.tasks.movielens.data import Ratings

    base = _audited_task(config, data_dir)
    split = base.split
    cat = split.catalogue
    users = np.flatnonzero(base.client_of_user(np.arange(cat.num_users)) >= 0)  # the federation's users
    if num_canaries > cat.num_items:
        raise InputError(f"--canaries {num_canaries}: each canary needs its own item; {split.source} has {cat.num_items} items")
    in_fed = base.client_of_user(split.train.user) >= 0
    counts = np.bincount(split.train.item[in_fed], minlength=cat.num_items)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xCA4A]))
    order = np.lexsort((rng.random(cat.num_items), counts))  # least-rated first, ties at random
    items = np.sort(order[:num_canaries])
    canaries = Ratings(
        rng.choice(users, size=num_canaries).astype(np.int64),
        items.astype(np.int64),
        rng.choice(np.asarray(CANARY_RATINGS, dtype=np.float32), size=num_canaries),
    )
    included = rng.random(num_canaries) < 0.5
    ordinary = split.train.subset(~np.isin(split.train.item, items))
    task = _with_training_ratings(base, _concat(ordinary, canaries))
    all_records = task.training_records()
    canary_records = all_records[-num_canaries:]
    keep = np.ones(len(all_records), dtype=bool)
    keep[-num_canaries:] = included
    return task.with_training_subset(keep), canary_records, included


def canary_scores(task, released: dict[str, np.ndarray], canary_records: np.ndarray) -> np.ndarray:
    """See :attr:`CanaryRun.scores`: only public information (released and initial params) is used."""
    from fedrlhf_secure.tasks.movielens.model import ITEM_EMBEDDING

    initial = task.initial_shared()[ITEM_EMBEDDING]
    item_pos = {int(m): i for i, m in enumerate(task.split.catalogue.item_ids)}
    rows = np.array([item_pos[int(m)] for m in canary_records[:, 1]], dtype=np.int64)
    moved = released[ITEM_EMBEDDING][rows].astype(np.float64) - initial[rows].astype(np.float64)
    return np.linalg.norm(moved, axis=1)


def run_canaries(config: RunConfig, data_dir: Path | None, num_canaries: int, seed: int) -> CanaryRun:
    task, records, included = canary_task(config, data_dir, num_canaries, seed)
    released = train_released(config, task, name="canary")
    return CanaryRun(records, included, canary_scores(task, released, records))
