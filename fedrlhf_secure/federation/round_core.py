"""The server's side of one round, once, for every place the participants live.

FedRLHF (arXiv 2412.15538), Algorithm 1, server part, with secure aggregation and DP:

1. **select** clients (``fraction`` of them, at least ``min_clients``) with the server's seeded RNG;
2. **admit**: with DP on, each participant host's own privacy half says which of its selected
   clients can afford another release (the server holds no ledger);
3. **broadcast** the global shared parameters in a ``fed/fit`` frame (none under CKKS, where only
   the clients hold the model; personal parameters are in no message);
4. **drive the aggregator's server half** (:class:`~.node_driver.NodeRoundDriver`): the fit request
   carries the aggregator's opening messages, so each host runs its participants' pipeline (local
   RLHF → clip → noise → ledger → mask/encrypt, :mod:`.participant`) and answers with their first
   aggregator messages; later stages relay the protocol until the server half is done;
5. **release** the aggregate: the server's privacy half adds central noise or discards an aggregate
   with too few survivors, then the average delta (sparse rows normalised by their touch weight,
   :mod:`.update`) is applied by the server optimizer (:mod:`.server_optimizer`, η = ``server_lr``).
   Under distributed DP-SGD with ``privacy.steps_per_round: S`` steps 1-5 run S times per round
   (each step a complete aggregation under protocol round ``r·S + s``, applied before the next
   step's fit; :mod:`fedrlhf_secure.privacy.distributed_dpsgd`), and step 6 once;
6. **collect reports**: every host evaluates the new model on its clients' held-out data. Under
   DP the reports carry no numbers (the participant's ``PlaintextPolicy`` keeps them on the
   client), so the pooled accuracy and ``train_loss_mean`` are absent or NaN here; the in-process
   runner pools the clients' own files instead (:func:`.results.adopt_local_metrics`).

The participants sit behind a :class:`~.node_driver.NodeLink`: in this process
(:mod:`.links`), in worker processes, or on Flower SuperNodes (:mod:`fedrlhf_secure.transport`).
The core never sees a client's data, personal parameters or individual update, and it holds no
run directory: :class:`~.engine.Federation` adds that around it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aggregation import wire
from aggregation.base import AggregateResult, AggregationAborted, Aggregator, RoundContext
from aggregation.driver import TranscriptHook

from ..config import RunConfig
from ..errors import RunFailed
from ..privacy.distributed_dpsgd import steps_per_round
from ..privacy.server import ServerPrivacy
from .messages import FitInstruction, Report
from .node_driver import NodeLink, NodeRoundDriver, NodeRoundOutcome
from .node_protocol import REQUEST, NodeMessage, NodeUnusable, client_key, read_response
from .server_optimizer import ServerOptimizer
from .update import UpdateCodec

logger = logging.getLogger(__name__)

SETUP_TIMEOUT = 600.0


class TransportError(RunFailed):
    """A participant host refused the run or could not be reached while it was being set up."""


class RoundStopped(RunFailed):
    """The run cannot take another round (too few clients can take part, an aggregation failed)."""


@dataclass
class _StepLog:
    """One aggregation of a round (several under ``privacy.steps_per_round``)."""

    outcome: NodeRoundOutcome
    selected: int
    refused: int
    admitted: list[int]
    contributors: tuple[int, ...]
    aborted: str | None
    losses: list[float]
    bytes_down: dict[int, int]
    bytes_up: dict[int, int]
    fit_seconds: float
    aggregation_seconds: float


@dataclass
class RoundLog:
    row: dict[str, Any]
    per_client: dict[int, dict[str, float]] = field(default_factory=dict)


class RoundCore:
    """Select → admit → broadcast → aggregate → release → reports, over participants behind ``link``."""

    def __init__(
        self,
        config: RunConfig,
        codec: UpdateCodec,
        client_ids: Sequence[int],
        initial_shared: Mapping[str, np.ndarray],
        link: NodeLink,
        nodes: Mapping[int, Sequence[int] | None],
        aggregator: Aggregator,
        privacy: ServerPrivacy,
        *,
        hook: TranscriptHook | None = None,
        on_stage: Callable[[int, str, int], None] | None = None,
        fit_timeout: float = 600.0,
        stage_timeout: float = 60.0,
    ) -> None:
        self.config = config
        self.fed = config.federation
        self.codec = codec
        self.client_ids = list(client_ids)
        self.link = link
        self.aggregator = aggregator
        self.privacy = privacy
        self.hook = hook
        if len(self.client_ids) < self.fed.min_clients:
            raise RoundStopped(f"federation.min_clients={self.fed.min_clients} but the task has only {len(self.client_ids)} clients")
        self.client_held = not aggregator.capabilities.server_reads_result
        self.nodes = self._setup_nodes(nodes)
        self.node_of = {c: n for n, cids in self.nodes.items() for c in cids}
        unhosted = sorted(set(self.client_ids) - set(self.node_of))
        if unhosted:
            raise TransportError(f"no node hosts clients {unhosted[:10]}{'...' if len(unhosted) > 10 else ''} of the task")
        self.driver = NodeRoundDriver(
            link, self.node_of, fit_timeout=fit_timeout, stage_timeout=stage_timeout, hook=hook, on_stage=on_stage
        )
        self.rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0xFED]))
        self.session_id = os.urandom(16)
        self.global_params = {k: np.asarray(v, dtype=np.float32).copy() for k, v in initial_shared.items()}
        """The server's copy of the global model; under CKKS the public initial one (the hosts hold the rest)."""
        self.model_round = -1
        """The last round whose aggregate was applied (-1: none yet)."""
        self.server_opt = ServerOptimizer(self.fed.server_optimizer, self.fed.server_lr)
        """θ ← θ + η·Δ̄, or momentum / Adam on the released (noised) mean: post-processing (:mod:`.server_optimizer`)."""

    # ------------------------------------------------------------------ set-up
    def _setup_nodes(self, nodes: Mapping[int, Sequence[int] | None]) -> dict[int, list[int]]:
        """Send the run config to every host; learn (or check) which clients each one hosts."""
        header = {"client_ids": list(self.client_ids)}
        blobs = {"config": self.config.to_yaml().encode("utf-8")}
        reqs = {n: NodeMessage("setup", header, blobs=blobs).encode(REQUEST) for n in nodes}
        raw = self.link.exchange(reqs, SETUP_TIMEOUT)
        hosted: dict[int, list[int]] = {}
        for n, expected in nodes.items():
            if n not in raw:
                raise TransportError(f"node {n} did not answer the setup request")
            try:
                msg = read_response(raw[n], "run")
                dim, got = msg.field("dim", int), sorted(msg.int_list("clients"))
            except NodeUnusable as exc:
                raise TransportError(f"node {n} {exc}") from exc
            except wire.WireError as exc:
                raise TransportError(f"node {n} sent a malformed run response ({exc})") from exc
            if dim != self.codec.dim:
                raise TransportError(f"node {n} computes update vectors of {dim} values, the server {self.codec.dim}")
            if expected is not None and got != sorted(expected):
                raise TransportError(f"node {n} reports clients {got}, expected {sorted(expected)}")
            twice = sorted(set(got) & {c for cids in hosted.values() for c in cids})
            if twice:
                raise TransportError(f"clients {twice} are hosted by more than one node")
            hosted[n] = got
        return hosted

    # ------------------------------------------------------------------ one round
    def select(self) -> list[int]:
        n = len(self.client_ids)
        k = min(n, max(self.fed.min_clients, math.ceil(self.fed.fraction * n)))
        if k == n:
            return list(self.client_ids)
        picked = self.rng.choice(n, size=k, replace=False)
        return sorted(self.client_ids[i] for i in picked)

    def admit(self, r: int, selected: Sequence[int]) -> list[int]:
        """Ask each host which of its selected clients its privacy half admits; a silent host's clients sit out."""
        if self.privacy.mode == "none":
            return list(selected)
        wanted: dict[int, list[int]] = {}
        for c in selected:
            wanted.setdefault(self.node_of[c], []).append(c)
        reqs = {n: NodeMessage("admit", {"round": r, "clients": cids}).encode(REQUEST) for n, cids in wanted.items()}
        raw = self.link.exchange(reqs, self.driver.stage_timeout)
        admitted: set[int] = set()
        for n, msg in usable_responses(raw, "admission", f"round {r}: ", "its clients sit out"):
            if n not in wanted:
                continue
            try:
                answer = msg.int_list("admitted")
            except wire.WireError as exc:
                logger.warning("round %d: node %d sent a malformed admission (%s); its clients sit out", r, n, exc)
                continue
            admitted.update(c for c in answer if c in wanted[n])
            spent = msg.header.get("epsilon_spent", {})
            for c, eps in spent.items() if isinstance(spent, dict) else ():
                cid = client_key(c)
                if cid is not None and self.node_of.get(cid) == n:
                    self.privacy.report(cid, eps)
        for c in selected:
            if c not in admitted:
                self.privacy.refuse(c)
        return [c for c in selected if c in admitted]

    @property
    def steps_per_round(self) -> int:
        """Aggregations per round: ``privacy.steps_per_round`` (distributed-noise DP-SGD, one noised
        gradient sum per step, :mod:`fedrlhf_secure.privacy.distributed_dpsgd`), else 1."""
        return steps_per_round(self.config)

    def protocol_round(self, r: int, step: int) -> int:
        """The round number step ``step`` of round ``r`` runs under: its secure-aggregation session,
        the clients' admission and ledger entry and the noise shares are per step (``r·S + step``);
        with one step per round it is ``r``."""
        return r * self.steps_per_round + step

    def run_round(
        self,
        r: int,
        progress: Callable[[str], None] = lambda _: None,
        *,
        start_step: int = 0,
        applied: int | None = None,
        after_step: Callable[[int, int, int], None] | None = None,
    ) -> RoundLog:
        """The round's ``steps_per_round`` aggregations (from ``start_step``: a resumed round skips the
        steps whose aggregate was already applied), each applied before the next fit, then one evaluation.

        ``after_step(r, step, applied)`` is called after each step's release (``applied``: the
        aggregations of this round applied so far), so the run can checkpoint mid-round."""
        t_round = time.perf_counter()
        steps = self.steps_per_round
        logs: list[_StepLog] = []
        applied = start_step if applied is None else int(applied)
        for s in range(start_step, steps):
            label = f"round {r}" if steps == 1 else f"round {r} step {s + 1}/{steps}"
            step = self._step(self.protocol_round(r, s), label, progress)
            logs.append(step)
            applied += step.aborted is None
            if after_step is not None:
                after_step(r, s, applied)

        progress(f"round {r}: evaluation")
        t0 = time.perf_counter()
        per_client = self.collect_reports(r, logs[-1].outcome.dropped_nodes if logs else set())
        t_eval = time.perf_counter() - t0

        report_bytes = {c: len(Report(c, r, m).encode()) for c, m in per_client.items()}
        last = logs[-1] if logs else None
        admitted = sorted({c for step in logs for c in step.admitted})
        bytes_down = [sum(step.bytes_down.get(c, 0) for step in logs) for c in admitted]
        bytes_up = [sum(step.bytes_up.get(c, 0) for step in logs) + report_bytes.get(c, 0) for c in admitted]
        losses = [loss for step in logs for loss in step.losses]
        aborted = [step.aborted for step in logs if step.aborted is not None]
        row: dict[str, Any] = {
            "round": r,
            **pool_metrics(per_client),
            "clients_selected": last.selected if last else 0,
            "clients_refused": last.refused if last else 0,
            "clients_aggregated": len(last.contributors) if last else 0,
            "clients_dropped": (len(last.admitted) - len(last.contributors)) if last else 0,
            "aggregation_aborted": aborted[0] if aborted else None,
            "train_loss_mean": nanmean(losses),
            "bytes_up_per_client": float(np.mean(bytes_up)) if bytes_up else 0.0,
            "bytes_down_per_client": float(np.mean(bytes_down)) if bytes_down else 0.0,
            "seconds_fit": sum(step.fit_seconds for step in logs),
            "seconds_aggregation": sum(step.aggregation_seconds for step in logs),
            "seconds_aggregation_server": sum(step.outcome.server_seconds for step in logs),
            "seconds_eval": t_eval,
            "transport_stages": sum(len(step.outcome.stages) for step in logs),
            "transport_envelope_bytes": int(sum(step.outcome.envelope_bytes for step in logs)),
            "nodes_dropped": len(set().union(*(step.outcome.dropped_nodes for step in logs))) if logs else 0,
        }
        if steps > 1:
            row["steps"] = steps
            row["aggregations"] = applied
        row.update(privacy_row(self.privacy.summary()))
        row["seconds"] = time.perf_counter() - t_round
        return RoundLog(row, per_client)

    def _step(self, t: int, label: str, progress: Callable[[str], None]) -> _StepLog:
        """One aggregation (protocol round ``t``): select → admit → broadcast → aggregate → release."""
        selected = self.select()
        admitted = self.admit(t, selected)
        refused = sorted(set(selected) - set(admitted))
        if refused:
            logger.warning("%s: %d client(s) refused by their privacy plan (budget) or unreachable", label, len(refused))
        if len(admitted) < self.fed.min_clients:
            raise RoundStopped(
                f"{label}: only {len(admitted)} client(s) can take part (federation.min_clients={self.fed.min_clients}); stopping"
            )
        instruction = FitInstruction(t, self.fed.local_epochs, self.config.seed, self.global_params, self.client_held).encode()
        if self.hook:
            for c in admitted:
                self.hook(-1, c, instruction)

        what = "local RLHF" if self.steps_per_round == 1 else "clipped gradient sums"
        progress(f"{label}: {what} and {self.aggregator.kind} aggregation on {len(admitted)} clients")
        ctx = RoundContext(self.session_id, t, tuple(admitted), self.codec.dim)
        outcome = self.driver.run(
            self.aggregator.server(ctx),
            ctx,
            instruction,
            server_can_read_result=not self.client_held,
            model_round=self.model_round,
            clip_counts=self.privacy.count_history(),
        )
        aborted, contributors = outcome.aborted, ()
        if aborted is None:
            try:
                contributors = self._release(t, outcome, len(admitted))
            except AggregationAborted as exc:
                aborted = str(exc)
        if aborted is not None:
            # Too few survivors (below the masking threshold, or below the noise the DP shares were
            # sized for): the step releases nothing and the model stays as it was. The ledgers keep
            # what the clients already spent: their updates did leave them.
            logger.warning("%s: aggregation aborted, the global model is unchanged: %s", label, aborted)
        fitted = [c for c in admitted if c in outcome.fit]
        for c in fitted:
            self.privacy.report(c, outcome.fit[c].get("epsilon_spent"))
        return _StepLog(
            outcome=outcome,
            selected=len(selected),
            refused=len(refused),
            admitted=list(admitted),
            contributors=tuple(contributors),
            aborted=aborted,
            losses=[_number(outcome.fit[c].get("metrics", {}).get("loss")) for c in fitted],
            bytes_down={c: len(instruction) + outcome.bytes_down.get(c, 0) for c in admitted},
            bytes_up={c: outcome.bytes_up.get(c, 0) for c in admitted},
            fit_seconds=outcome.stages[0].seconds if outcome.stages else 0.0,
            aggregation_seconds=sum(x.seconds for x in outcome.stages[1:]),
        )

    def _release(self, r: int, outcome: NodeRoundOutcome, admitted: int) -> tuple[int, ...]:
        """The aggregate becomes the next model (or, under CKKS, each host already applied what it decrypted)."""
        if self.client_held:
            if outcome.client_contributors is None:
                raise AggregationAborted(f"round {r}: no client could read the aggregate")
            if outcome.client_discarded is not None:
                raise AggregationAborted(f"round {r}: the clients discarded the aggregate: {outcome.client_discarded}")
            self.privacy.check_contributors(r, outcome.client_contributors, admitted)
            self.model_round = r
            return outcome.client_contributors
        result: AggregateResult | None = outcome.server_result
        if result is None:
            raise AggregationAborted(f"round {r}: the aggregation produced no result")
        result = self.privacy.finalize(r, result, admitted)
        self.global_params = self.server_opt.apply(self.global_params, self.codec, result)
        if self.codec.count_slot:  # adaptive clipping: the noised count of this release moves C for the next rounds
            self.privacy.observe_count(r, self.codec.count_total(result), len(result.contributors))
        self.model_round = r
        return result.contributors

    def collect_reports(self, r: int, dropped: set[int]) -> dict[int, dict[str, float]]:
        shared_msg = FitInstruction(r, 0, self.config.seed, self.global_params, self.client_held).encode()
        reqs = {
            n: NodeMessage("evaluate", {"round": r, "clients": cids, "model_round": self.model_round}, blobs={"shared": shared_msg}).encode(
                REQUEST
            )
            for n, cids in self.nodes.items()
            if n not in dropped
        }
        raw = self.link.exchange(reqs, self.driver.fit_timeout)
        per_client: dict[int, dict[str, float]] = {}
        for n, msg in usable_responses(raw, "evaluation", f"round {r}: ", "ignored"):
            for c, frames in msg.messages.items():
                if self.node_of.get(c) != n or len(frames) != 1:
                    continue
                try:
                    rep = Report.decode(frames[0])
                except wire.WireError as exc:
                    logger.warning("round %d: client %d sent a malformed report (%s); ignored", r, c, exc)
                    continue
                if rep.client_id == c and rep.round == r:
                    per_client[c] = dict(rep.metrics)
                    if self.hook:
                        self.hook(c, -1, frames[0])
        return {c: per_client[c] for c in sorted(per_client)}

    def release_model(self, last_round: int) -> dict[str, np.ndarray]:
        """The final model under CKKS: every host that holds it sends it; the copy a strict majority
        of the answering hosts agree on is released. One host's different (or malformed) copy is
        logged and outvoted, so it can neither change the release nor end the run; without a
        majority nothing is released."""
        reqs = {n: NodeMessage("release", {}).encode(REQUEST) for n in self.nodes}
        raw = self.link.exchange(reqs, self.driver.stage_timeout)
        copies: list[tuple[int, dict[str, np.ndarray]]] = []
        for n, msg in usable_responses(raw, "model release", "", "ignored"):
            held = msg.header.get("round")
            if isinstance(held, bool) or held != last_round:
                logger.warning("node %d holds the model of round %.20r, not the last round's; ignored", n, held)
                continue
            model = {k: np.asarray(v, dtype=np.float32) for k, v in msg.arrays.items()}
            if sorted(model) != sorted(self.global_params) or any(model[k].shape != self.global_params[k].shape for k in model):
                logger.warning("node %d released a model of the wrong layout; ignored", n)
                continue
            copies.append((n, model))
        if not copies:
            raise TransportError("no node could release the final model it holds")
        groups: list[list[tuple[int, dict[str, np.ndarray]]]] = []
        for n, model in copies:
            for group in groups:
                if all(np.array_equal(group[0][1][k], model[k]) for k in model):
                    group.append((n, model))
                    break
            else:
                groups.append([(n, model)])
        groups.sort(key=len, reverse=True)
        if 2 * len(groups[0]) <= len(copies):
            raise TransportError(
                f"the nodes hold different final models and no copy has a majority "
                f"({[sorted(n for n, _ in g) for g in groups]}; an aggregate was applied inconsistently)"
            )
        if len(groups) > 1:
            dissent = sorted(n for g in groups[1:] for n, _ in g)
            logger.warning("nodes %s released a final model that differs from the majority's; outvoted", dissent)
        return groups[0][0][1]


def usable_responses(raw: Mapping[int, bytes], what: str, where: str, consequence: str) -> Iterator[tuple[int, NodeMessage]]:
    """Each host's decoded answer; a malformed frame or the host's error report is logged and skipped.

    One host's bad answer costs only its own clients' part in this step, never the run.
    """
    for n, data in raw.items():
        try:
            yield n, read_response(data, what)
        except NodeUnusable as exc:
            logger.warning("%snode %d %s; %s", where, n, exc, consequence)


def _number(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan")


def nanmean(values) -> float:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def pool_metrics(per_client: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    """Pool clients' reports: counts are summed into rates, other numbers are averaged (without DP
    from the report frames; under DP only the embedded simulation pools, from the clients' own files).

    ``correct``/``n`` give the held-out accuracy (the primary metric), ``train_correct``/``train_n``
    the training accuracy (the FedRLHF paper's metric, kept for comparison), per-client
    ``accuracy`` gives the spread, and every other metric ``m`` becomes ``m_mean``.
    """
    out: dict[str, float] = {}
    rows = list(per_client.values())
    if not rows:
        return out

    def total(key: str) -> float:
        return float(sum(r.get(key, 0.0) for r in rows if np.isfinite(r.get(key, 0.0))))

    if any("n" in r for r in rows) and total("n") > 0:
        out["heldout_accuracy"] = total("correct") / total("n")
    if any("train_n" in r for r in rows) and total("train_n") > 0:
        out["train_accuracy"] = total("train_correct") / total("train_n")
    accs = np.asarray([r["accuracy"] for r in rows if "accuracy" in r and np.isfinite(r["accuracy"])])
    if accs.size:
        out["client_accuracy_std"] = float(accs.std())
        out["client_accuracy_p10"] = float(np.percentile(accs, 10))
        out["client_accuracy_p90"] = float(np.percentile(accs, 90))
    skip = {"n", "correct", "train_n", "train_correct", "accuracy"}
    keys = sorted({k for r in rows for k in r} - skip)
    for k in keys:
        out[f"{k}_mean"] = nanmean([r.get(k) for r in rows])
    return out


def privacy_row(summary: Mapping[str, Any]) -> dict[str, Any]:
    return {f"privacy_{k}": v for k, v in summary.items() if isinstance(v, (int, float, str)) or v is None}
