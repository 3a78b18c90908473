"""Training runs for audits: shadow runs on random halves of the candidates, and canary runs.

Every model an audit trains is trained by the project's own federation code
(:func:`fedrlhf_secure.federation.engine.run_federation`) with the audited run's own config —
same clients, rounds, aggregation and privacy plan — on a task whose training records the audit
chooses through the task's :class:`~fedrlhf_secure.tasks.auditable.AuditableTask` interface
(``with_records``). Only the released global shared parameters of those runs are used, as an
outside attacker would see them. Nothing here knows which task it audits.

* **Candidates** of the membership game on a run are the audited task's training records
  (members) and records from the same distribution it never trained on (non-members), from
  :meth:`~fedrlhf_secure.tasks.auditable.AuditableTask.membership_candidates`. Shadow runs train on
  independent random halves of *all* candidates, so every candidate is IN about half of the shadow
  runs and OUT of the rest (Carlini et al. 2022, §IV), non-members included.
* **Canaries** (for the one-run ε audit) are ``m`` extra records the task inserts
  (:meth:`~fedrlhf_secure.tasks.auditable.AuditableTask.with_canaries`), each included with
  probability ½ by a coin the audit flips; the task scores them on the released parameters
  (:meth:`~fedrlhf_secure.tasks.auditable.AuditableTask.canary_scores`). The one-run audit needs
  many canaries, each easy to detect (Steinke et al. 2023, §6).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from fedrlhf_secure.config import RunConfig, load_config
from fedrlhf_secure.rundir import load_tensors
from fedrlhf_secure.tasks.auditable import AuditableTask, AuditUnsupported, check_auditable_kind, require_auditable

__all__ = [
    "AuditUnsupported",
    "CandidatePool",
    "CanaryRun",
    "audited_task",
    "candidate_pool",
    "canary_scores",
    "canary_task",
    "ensure_supported",
    "load_run_config",
    "run_canaries",
    "shadow_inclusions",
    "train_released",
    "train_shadows",
]

logger = logging.getLogger(__name__)


def load_run_config(run_dir: Path) -> RunConfig:
    """The resolved config a run directory was trained with (``config.yaml``), read and validated
    by :func:`fedrlhf_secure.config.load_config` like any other config file."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: {path} is missing")
    return load_config(path)


def ensure_supported(config: RunConfig) -> None:
    """Raise :class:`AuditUnsupported` before any work when the run's task kind is declared not to
    implement :class:`~fedrlhf_secure.tasks.auditable.AuditableTask` (checked again on the built task)."""
    check_auditable_kind(config.task.kind)


def audited_task(config: RunConfig, data_dir: Path | None) -> AuditableTask:
    """The audited run's own task, built by the task's registered factory exactly as ``fedrlhf run``
    built it (same split, clients, feedback and initial parameters); :class:`AuditUnsupported` when
    it does not implement :class:`~fedrlhf_secure.tasks.auditable.AuditableTask`."""
    from fedrlhf_secure.federation.engine import build_task, resolve_data_dir

    ensure_supported(config)
    return require_auditable(build_task(config, resolve_data_dir(data_dir)), config.task.kind)


@dataclass
class CandidatePool:
    """The membership game on one run: ``records`` (N, k) as from ``task.training_records()``,
    ``member`` (N,) bool for the audited run, and a task over all candidates from which subset
    tasks are made."""

    config: RunConfig
    records: np.ndarray
    member: np.ndarray
    task: AuditableTask

    def subset_task(self, keep: np.ndarray) -> AuditableTask:
        return self.task.with_records(keep)

    def scores(self, shared: dict[str, np.ndarray], records: np.ndarray | None = None) -> np.ndarray:
        """Logit-scaled confidence of every candidate (or of ``records``) under released ``shared`` params."""
        return np.asarray(self.task.record_scores(shared, self.records if records is None else records), dtype=np.float64)


def candidate_pool(config: RunConfig, data_dir: Path | None, *, task: AuditableTask | None = None) -> CandidatePool:
    """Members (the audited task's training records) and non-members (see the module docstring).
    ``task``: the audited task when already built (else built from ``config``)."""
    audited = audited_task(config, data_dir) if task is None else require_auditable(task, config.task.kind)
    members = audited.training_records()
    candidates = audited.membership_candidates()
    records = candidates.task.training_records()
    member = np.asarray(candidates.member, dtype=bool)
    if member.shape != (len(records),) or not np.array_equal(records[member], members):
        raise RuntimeError(f"{type(audited).__name__}.membership_candidates(): the member rows are not the audited run's training records")
    return CandidatePool(config, records, member, candidates.task)


def train_released(config: RunConfig, task, *, name: str, noise=None) -> dict[str, np.ndarray]:
    """Run the federation of ``config`` on ``task`` in a scratch directory; return the released params.

    ``noise`` is the run's DP noise source (None: the secret one). Only tests pass one: the audit's
    positive control trains its canary run with the same deliberately broken mechanism as the run."""
    from fedrlhf_secure.federation.engine import RunOptions, run_federation

    config = replace(config, baselines=())  # a shadow needs only its released parameters
    logger.debug("training %s on %s", name, type(task).__name__)
    with tempfile.TemporaryDirectory(prefix="fedrlhf-audit-") as tmp:
        run = run_federation(config, RunOptions(out=Path(tmp), progress=False, task=task, name=name, noise=noise))
        return load_tensors(run / "model.safetensors")


def shadow_inclusions(num_shadows: int, num_candidates: int, seed: int) -> np.ndarray:
    """(K, N) bool: each candidate IN each shadow run independently with probability ½."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5AD0]))
    return rng.random((num_shadows, num_candidates)) < 0.5


def train_shadows(pool: CandidatePool, inclusions: np.ndarray, *, on_done: Callable[[int], None] | None = None, noise=None) -> np.ndarray:
    """(K, N) true-label logits of every candidate under each shadow run's released params."""
    out = np.empty(inclusions.shape, dtype=np.float64)
    for k, keep in enumerate(inclusions):
        released = train_released(pool.config, pool.subset_task(keep), name=f"shadow-{k}", noise=noise)
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
    """(m, k) canary records, as the task lists them in ``training_records()``."""
    included: np.ndarray
    scores: np.ndarray
    """Per canary: the task's :meth:`~fedrlhf_secure.tasks.auditable.AuditableTask.canary_scores`
    on the released parameters (higher = more likely included)."""


def canary_task(config: RunConfig, data_dir: Path | None, num_canaries: int, seed: int):
    """The audited task with ``num_canaries`` canaries, each kept with probability ½; returns
    ``(task, canary_records, included)``. The task's canary choices and the audit's coins come
    from one generator seeded by ``seed``."""
    base = audited_task(config, data_dir)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xCA4A]))
    canaries = base.with_canaries(num_canaries, rng)
    included = rng.random(num_canaries) < 0.5
    keep = np.ones(len(canaries.task.training_records()), dtype=bool)
    keep[canaries.index] = included
    return canaries.task.with_records(keep), canaries.records, included


def canary_scores(task: AuditableTask, released: dict[str, np.ndarray], canary_records: np.ndarray) -> np.ndarray:
    """See :attr:`CanaryRun.scores`: only public information (released and initial params) is used."""
    return np.asarray(task.canary_scores(released, canary_records), dtype=np.float64)


def run_canaries(config: RunConfig, data_dir: Path | None, num_canaries: int, seed: int, *, noise=None) -> CanaryRun:
    task, records, included = canary_task(config, data_dir, num_canaries, seed)
    released = train_released(config, task, name="canary", noise=noise)
    return CanaryRun(records, included, canary_scores(task, released, records))
