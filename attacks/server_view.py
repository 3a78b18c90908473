"""Membership inference on what the *server* sees: one client's plain update vs a secure aggregate.

Threat model (b) of issue 6: an honest-but-curious server records every byte it receives
(:func:`aggregation.driver.run_round`'s transcript hook) and tries to tell which of a client's
ratings were in that client's training data.

* **Plain FedAvg** (:mod:`aggregation.plain`): the server decodes each ``plain/update`` frame and
  holds client k's own delta ``Δ_k``; its guess for a record of client k is how much
  ``θ_0 + Δ_k`` raised the record's score (:meth:`AuditableTask.record_scores`) over the broadcast
  ``θ_0`` (a difference attack with the pre-round model as the reference). The update also carries
  in the clear which rows of each ``sparse_rows`` parameter the client touched; a record whose row
  (:meth:`AuditableTask.record_rows`) was not touched cannot have been trained on.
* **Secure aggregation** (masking or CKKS): individual frames are masked or encrypted; all that
  can be learned is the aggregate of ≥ ``num_clients`` updates, i.e. the next global model
  ``θ_1``; the same difference score is computed from ``θ_1`` for every record.

Members and non-members come from the same clients: each of a client's training records is kept
with probability ½ (kept = member, dropped = non-member), so the attack cannot win by recognising
clients. Both federations use the same config, seeds and data; only the aggregator differs. The
task is reduced to ``num_clients`` clients by :meth:`AuditableTask.with_num_clients`.
(:class:`~fedrlhf_secure.tasks.auditable.AuditableTask` is all this module knows of the task.)
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aggregation import wire
from aggregation.driver import SERVER_ID
from aggregation.plain import UPDATE as PLAIN_UPDATE
from fedrlhf_secure.config import RunConfig, build_config
from fedrlhf_secure.rundir import load_tensors
from fedrlhf_secure.tasks.auditable import AuditableTask

from .metrics import AttackMetrics, summarize
from .shadows import audited_task, candidate_pool

MIN_AGGREGATE_CLIENTS = 50


@dataclass
class ServerViewResult:
    plain_update: AttackMetrics
    secure_aggregate: AttackMetrics
    secure_kind: str
    clients: int
    records: int
    plain_scores: np.ndarray
    secure_scores: np.ndarray
    labels: np.ndarray

    def to_dict(self) -> dict:
        return {
            "plain_update": self.plain_update.to_dict(),
            "secure_aggregate": self.secure_aggregate.to_dict(),
            "secure_kind": self.secure_kind,
            "clients": self.clients,
            "records": self.records,
        }


def server_view_config(config: RunConfig, kind: str, params: dict | None = None) -> RunConfig:
    """The audited config reduced to one round with every client selected, aggregated by ``kind``
    (the task, reduced to the aggregate's clients, is passed to the run separately)."""
    raw = config.to_mapping()
    raw["federation"].update({"rounds": 1, "fraction": 1.0, "dropout_rate": 0.0, "workers": 1})
    raw["aggregation"] = {"kind": kind, **(params or {})}
    raw["baselines"] = []
    return build_config(raw, source=f"{config.source or '<config>'} (server-view audit)")


def _touched_records(task: AuditableTask, vector_len: int):
    """``f(vector, records) -> bool``: did the update touch every sparse row each record can move?
    The touch indicators of the ``sparse_rows`` parameters follow the deltas in the update vector,
    one per row, in spec order (:mod:`fedrlhf_secure.federation.update`); a record whose row did not
    move cannot have been trained on (without record-level DP, which touches every row)."""
    offsets, pos = {}, vector_len
    for e in task.shared_spec().entries:
        if e.sparse_rows:
            offsets[e.name] = (pos, e.shape[0])
            pos += e.shape[0]

    def f(vector: np.ndarray, records: np.ndarray) -> np.ndarray:
        seen = np.ones(len(records), dtype=bool)
        if len(vector) < pos:  # the update carries no touch indicators (``sparse_rows: all``)
            return seen
        for name, rows in task.record_rows(records).items():
            if name in offsets:
                seen &= vector[offsets[name][0] + np.asarray(rows, dtype=np.int64)] > 0.5
        return seen

    return f


def _capture_plain_updates(config: RunConfig, task) -> dict[int, tuple[np.ndarray, float]]:
    from fedrlhf_secure.federation.engine import RunOptions, run_federation

    updates: dict[int, tuple[np.ndarray, float]] = {}

    def hook(src: int, dst: int, data: bytes) -> None:
        if dst != SERVER_ID:
            return
        frame = wire.decode(data)
        if frame.kind == PLAIN_UPDATE:
            updates[src] = (frame.tensor("vector", np.float32), float(frame.field("weight", (int, float))))

    with tempfile.TemporaryDirectory(prefix="fedrlhf-serverview-") as tmp:
        run_federation(config, RunOptions(out=Path(tmp), progress=False, task=task, hook=hook, name="plain-view"))
    return updates


def server_view_audit(
    config: RunConfig,
    data_dir: Path | None,
    *,
    num_clients: int = MIN_AGGREGATE_CLIENTS,
    secure_kind: str = "secagg",
    secure_params: dict | None = None,
    seed: int = 0,
) -> ServerViewResult:
    if num_clients < MIN_AGGREGATE_CLIENTS:
        raise ValueError(f"the aggregate side needs >= {MIN_AGGREGATE_CLIENTS} clients, got {num_clients}")
    from fedrlhf_secure.federation.engine import RunOptions, run_federation

    plain_cfg = server_view_config(config, "plain")
    secure_cfg = server_view_config(config, secure_kind, secure_params)
    pool = candidate_pool(plain_cfg, data_dir, task=audited_task(config, data_dir).with_num_clients(num_clients))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5E4F]))
    kept = pool.member & (rng.random(len(pool.records)) < 0.5)
    idx = np.flatnonzero(pool.member)  # candidates: the clients' training records, half of them kept
    records, labels = pool.records[idx], kept[idx]
    task = pool.subset_task(kept)
    theta0 = task.initial_shared()
    base = pool.scores(theta0, records)

    updates = _capture_plain_updates(plain_cfg, task)
    spec = task.shared_spec()
    owner = task.record_clients(records)
    plain = np.zeros(len(records), dtype=np.float64)
    touched = _touched_records(task, vector_len=spec.size)
    for cid, (vector, _weight) in updates.items():
        delta = spec.unflatten(vector[: spec.size])
        rows = owner == cid
        if rows.any():
            local = {k: theta0[k] + delta[k] for k in theta0}
            diff = pool.scores(local, records[rows]) - base[rows]
            seen = touched(vector, records[rows])
            plain[rows] = np.where(seen, diff, -np.inf)
    plain[np.isneginf(plain)] = (plain[np.isfinite(plain)].min() - 1.0) if np.isfinite(plain).any() else -1.0
    missing = sorted(set(np.unique(owner).tolist()) - set(updates))
    if missing:
        raise RuntimeError(f"no plain update captured from clients {missing[:5]}")

    with tempfile.TemporaryDirectory(prefix="fedrlhf-serverview-") as tmp:
        run = run_federation(secure_cfg, RunOptions(out=Path(tmp), progress=False, task=task, name="secure-view"))
        theta1 = load_tensors(run / "model.safetensors")
    secure = pool.scores(theta1, records) - base
    return ServerViewResult(
        plain_update=summarize(plain, labels, seed),
        secure_aggregate=summarize(secure, labels, seed),
        secure_kind=secure_kind,
        clients=len(updates),
        records=len(records),
        plain_scores=plain,
        secure_scores=secure,
        labels=labels,
    )
