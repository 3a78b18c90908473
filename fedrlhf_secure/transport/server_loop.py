"""The server's round loop when the clients live on remote nodes (FedRLHF, Algorithm 1, server part).

It is the engine's :class:`~fedrlhf_secure.federation.engine.Federation` — same client selection
with the same seeded RNG, same update codec, same ``server_lr`` step, same metrics pooling, run
directory, checkpoints and summary — with the clients replaced by nodes: the fit instruction, the
aggregator's messages and the evaluation go out as :mod:`.node_protocol` frames through a
:class:`~.node_driver.NodeLink`, and only the aggregate comes back. With the same config and seed
it therefore produces the in-process run's numbers.

The server builds the task object only for the public facts it needs (the shared-parameter
layout, the seeded initial model, the client ids); it never creates a client, so no client's
private data, personal parameters or individual update is ever in this process.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from aggregation import wire
from aggregation.base import AggregateResult, AggregationAborted, RoundContext

from ..config import RunConfig
from ..federation.engine import (
    Federation,
    RoundLog,
    RunOptions,
    _complete,
    _nanmean,
    _privacy_row,
    _Stop,
    build_task,
    pool_metrics,
    resolve_data_dir,
)
from ..federation.messages import FitInstruction, Report
from ..federation.update import UpdateCodec
from ..rundir import RunDirectory
from .aggregator_keys import server_aggregator
from .node_driver import NodeLink, NodeRoundDriver, NodeRoundOutcome
from .node_protocol import REQUEST, RESPONSE, NodeMessage

SETUP_TIMEOUT = 600.0


class TransportError(RuntimeError):
    """A node refused the run or could not be reached while it was being set up."""


class _RemoteClients:
    """What the engine's checkpointing asks of its clients: personal state stays on the nodes."""

    def personal_states(self) -> dict[int, dict[str, np.ndarray]]:
        return {}

    def close(self) -> None:
        pass


class ReportedPrivacy:
    """What the server knows of DP over nodes: each client's ε spent *as its node reports it*.

    The ledger, the calibration and the budget enforcement are on the nodes (client side); these
    numbers are plaintext metadata for metrics.jsonl / summary.json, and the server cannot check
    them. Keys mirror :meth:`~fedrlhf_secure.privacy.budget.BudgetedPlan.summary`.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.spent: dict[int, float] = {}
        self.refused: set[int] = set()

    def report(self, client_id: int, epsilon: Any) -> None:
        if self.mode == "none" or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) or epsilon < 0:
            return
        self.spent[client_id] = float(epsilon)

    def summary(self) -> dict[str, Any]:
        if self.mode == "none":
            return {"mode": "none", "epsilon_spent_max": None}
        values = [v for v in self.spent.values()]
        return {
            "mode": self.mode,
            "reported_by": "nodes",
            "epsilon_spent_max": max(values) if values else 0.0,
            "epsilon_spent_mean": float(np.mean(values)) if values else 0.0,
            "clients_with_releases": sum(1 for v in values if v > 0),
            "clients_refused": len(self.refused),
            "epsilon_per_client": {str(c): v for c, v in sorted(self.spent.items())},
        }


class RemoteFederation(Federation):
    """:class:`Federation` whose clients are on nodes reached through ``link``."""

    def __init__(
        self,
        config: RunConfig,
        run: RunDirectory,
        options: RunOptions,
        link: NodeLink,
        nodes: Mapping[int, Sequence[int] | None],
        *,
        fit_timeout: float,
        stage_timeout: float,
        on_stage: Callable[[int, str, int], None] | None = None,
        keys_dir: Path | None = None,
    ) -> None:
        if config.privacy.mode == "client" and config.privacy.noise == "central":
            raise ValueError(
                "privacy.noise 'central' over nodes would make the server hold the privacy plan; use privacy.noise: "
                "distributed (each node adds and accounts its own clients' noise share)"
            )
        if config.federation.dropout_rate > 0:
            raise ValueError("federation.dropout_rate simulates dropouts in process; over a network dropouts are real: set it to 0")
        self.config = config
        self.run = run
        self.options = options
        self.fed = config.federation
        self.task = build_task(config, options.data_dir)
        self.spec = self.task.shared_spec()
        self.codec = UpdateCodec(self.spec, self.fed.sparse_rows)
        self.client_ids = list(self.task.client_ids())
        self.link = link
        if len(self.client_ids) < self.fed.min_clients:
            raise ValueError(f"federation.min_clients={self.fed.min_clients} but the task has only {len(self.client_ids)} clients")
        self.clients = _RemoteClients()  # type: ignore[assignment]
        self.aggregator = server_aggregator(config, self.client_ids, keys_dir)  # fail on missing keys before any node is contacted
        self.nodes = self._setup_nodes(nodes)
        self.sizes: dict[int, int] = {}  # example counts stay on the nodes (they are the hidden FedAvg weights)
        self.node_of = {c: n for n, cids in self.nodes.items() for c in cids}
        unhosted = sorted(set(self.client_ids) - set(self.node_of))
        if unhosted:
            raise TransportError(f"no node hosts clients {unhosted[:10]}{'...' if len(unhosted) > 10 else ''} of the task")
        self.privacy = ReportedPrivacy(config.privacy.mode)
        self._init_run_state()
        self.driver = NodeRoundDriver(
            link, self.node_of, fit_timeout=fit_timeout, stage_timeout=stage_timeout, hook=options.hook, on_stage=on_stage
        )

    def _setup_nodes(self, nodes: Mapping[int, Sequence[int] | None]) -> dict[int, list[int]]:
        """Send the run config to every node; learn (or check) which clients each one hosts."""
        header = {"client_ids": list(self.client_ids)}
        blobs = {"config": self.config.to_yaml().encode("utf-8")}
        reqs = {n: NodeMessage("setup", header, blobs=blobs).encode(REQUEST) for n in nodes}
        raw = self.link.exchange(reqs, SETUP_TIMEOUT)
        hosted: dict[int, list[int]] = {}
        for n, expected in nodes.items():
            if n not in raw:
                raise TransportError(f"node {n} did not answer the setup request")
            try:
                msg = NodeMessage.decode(raw[n], RESPONSE)
            except wire.WireError as exc:
                raise TransportError(f"node {n} sent a malformed setup response: {exc}") from exc
            if "error" in msg.header:
                raise TransportError(f"node {n} refused the run: {msg.header['error']}")
            if msg.field("dim", int) != self.codec.dim:
                raise TransportError(f"node {n} computes update vectors of {msg.header['dim']} values, the server {self.codec.dim}")
            got = sorted(msg.int_list("clients"))
            if expected is not None and got != sorted(expected):
                raise TransportError(f"node {n} reports clients {got}, expected {sorted(expected)}")
            twice = sorted(set(got) & {c for cids in hosted.values() for c in cids})
            if twice:
                raise TransportError(f"clients {twice} are hosted by more than one node")
            hosted[n] = got
        return hosted

    def run_round(self, r: int, progress: Callable[[str], None]) -> RoundLog:
        t_round = time.perf_counter()
        selected = self._select()
        admitted = self._admit(r, selected) if self.config.privacy.mode != "none" else list(selected)
        refused = sorted(set(selected) - set(admitted))
        if refused:
            print(f"round {r}: {len(refused)} client(s) refused by their nodes (privacy budget, or the node is unreachable)", file=sys.stderr)
        self._check_quorum(r, admitted)
        client_held = self._client_held()
        instruction = self._broadcast(r, admitted, client_held)

        progress(f"round {r}: local RLHF and {self.config.aggregation.kind} aggregation on {len(admitted)} clients")
        t0 = time.perf_counter()
        ctx = RoundContext(self.session_id, r, tuple(admitted), self.codec.dim)
        try:
            outcome: NodeRoundOutcome = self.driver.run(
                self.aggregator.server(ctx), ctx, instruction, server_can_read_result=not client_held
            )
        except AggregationAborted as exc:
            raise _Stop(f"round {r}: aggregation failed: {exc}") from exc
        if client_held:
            # CKKS: the nodes applied the aggregate they decrypted; the server learns only whose
            # updates it summed (which it knew from the ciphertexts it added)
            if outcome.client_contributors is None:
                raise _Stop(f"round {r}: no client could read the aggregate")
            contributors = outcome.client_contributors
        else:
            result: AggregateResult | None = outcome.server_result
            if result is None:
                raise _Stop(f"round {r}: the aggregation produced no result")
            contributors = result.contributors
            need = self._survivors_required(len(admitted))
            if len(contributors) < need:
                raise _Stop(
                    f"round {r}: {len(contributors)} contributors survived but the nodes' distributed noise shares were sized "
                    f"for {need} (privacy.survivor_fraction); the aggregate is discarded"
                )
            avg = self.codec.decode(result)
            for k, d in avg.items():
                self.global_params[k] = (self.global_params[k] + self.fed.server_lr * d).astype(np.float32)
        t_round_trip = time.perf_counter() - t0

        progress(f"round {r}: evaluation")
        t0 = time.perf_counter()
        shared_msg = FitInstruction(r, 0, self.config.seed, self.global_params, client_held).encode()
        per_client = self._evaluate(r, shared_msg, outcome.dropped_nodes)
        t_eval = time.perf_counter() - t0

        report_bytes = {c: len(Report(c, r, m).encode()) for c, m in per_client.items()}
        fitted = [c for c in admitted if c in outcome.fit]
        for c in fitted:
            self.privacy.report(c, outcome.fit[c].get("epsilon_spent"))
        bytes_down = [len(instruction) + outcome.bytes_down[c] for c in admitted]
        bytes_up = [outcome.bytes_up[c] + report_bytes.get(c, 0) for c in admitted]
        losses = [outcome.fit[c].get("metrics", {}).get("loss") for c in fitted]
        row: dict[str, Any] = {
            "round": r,
            **pool_metrics(per_client),
            "clients_selected": len(selected),
            "clients_refused": len(refused),
            "clients_aggregated": len(contributors),
            "clients_dropped": len(admitted) - len(contributors),
            "train_loss_mean": _nanmean([float("nan") if v is None else v for v in losses]),
            "bytes_up_per_client": float(np.mean(bytes_up)),
            "bytes_down_per_client": float(np.mean(bytes_down)),
            "seconds_fit_and_aggregation": t_round_trip,
            "seconds_aggregation_server": outcome.server_seconds,
            "seconds_eval": t_eval,
            "transport_stages": len(outcome.stages),
            "transport_envelope_bytes": int(outcome.envelope_bytes),
            "nodes_dropped": len(outcome.dropped_nodes),
        }
        row.update(_privacy_row(self.privacy.summary()))
        row["seconds"] = time.perf_counter() - t_round
        return RoundLog(row, per_client)

    def _admit(self, r: int, selected: Sequence[int]) -> list[int]:
        """Ask each node which of its selected clients its privacy plan admits; a silent node's clients sit out."""
        wanted: dict[int, list[int]] = {}
        for c in selected:
            wanted.setdefault(self.node_of[c], []).append(c)
        reqs = {n: NodeMessage("admit", {"round": r, "clients": cids}).encode(REQUEST) for n, cids in wanted.items()}
        raw = self.link.exchange(reqs, self.driver.stage_timeout)
        admitted: set[int] = set()
        for n, msg in _usable_responses(raw, "admission", f"round {r}: ", "its clients sit out"):
            if n not in wanted:
                continue
            try:
                answer = msg.int_list("admitted")
            except wire.WireError as exc:
                print(f"round {r}: node {n} sent a malformed admission ({exc}); its clients sit out", file=sys.stderr)
                continue
            admitted.update(c for c in answer if c in wanted[n])
            spent = msg.header.get("epsilon_spent", {})
            for c, eps in spent.items() if isinstance(spent, dict) else ():
                if c.isdigit() and self.node_of.get(int(c)) == n:
                    self.privacy.report(int(c), eps)
        for c in selected:
            if c not in admitted:
                self.privacy.refused.add(c)
        return [c for c in selected if c in admitted]

    def _survivors_required(self, admitted: int) -> int:
        """The contributors the nodes' distributed noise shares were sized for (0 without distributed noise)."""
        p = self.config.privacy
        if p.mode != "client" or p.noise != "distributed":
            return 0
        return min(admitted, max(self.fed.min_clients, math.ceil(p.survivor_fraction * admitted)))

    def _save_checkpoint(self, completed_round: int) -> None:
        """No resume over nodes: personal state and (CKKS) the model live on the nodes, not here."""

    def run_all(self) -> dict[str, Any]:
        timing = super().run_all()
        if not self.aggregator.server_can_read_result and self.history:
            self.global_params = self._release()
        return timing

    def _release(self) -> dict[str, np.ndarray]:
        """The final model for ``model.safetensors`` under CKKS: every node that holds it sends it, all must agree."""
        reqs = {n: NodeMessage("release", {}).encode(REQUEST) for n in self.nodes}
        raw = self.link.exchange(reqs, self.driver.stage_timeout)
        copies = []
        for n, msg in _usable_responses(raw, "model release", "", "ignored"):
            if msg.header.get("round") != self.history[-1]["round"]:
                print(f"node {n} holds the model of round {msg.header.get('round')}, not the last round's; ignored", file=sys.stderr)
                continue
            model = {k: np.asarray(v, dtype=np.float32) for k, v in msg.arrays.items()}
            if sorted(model) != sorted(self.global_params) or any(model[k].shape != self.global_params[k].shape for k in model):
                print(f"node {n} released a model of the wrong layout; ignored", file=sys.stderr)
                continue
            copies.append(model)
        if not copies:
            raise TransportError("no node could release the final model it holds")
        for other in copies[1:]:
            if any(not np.array_equal(copies[0][k], other[k]) for k in other):
                raise TransportError("the nodes hold different final models (an aggregate was applied inconsistently)")
        return copies[0]

    def _evaluate(self, r: int, shared_msg: bytes, dropped: set[int]) -> dict[int, dict[str, float]]:
        reqs = {
            n: NodeMessage("evaluate", {"round": r, "clients": cids}, blobs={"shared": shared_msg}).encode(REQUEST)
            for n, cids in self.nodes.items()
            if n not in dropped
        }
        raw = self.link.exchange(reqs, self.driver.fit_timeout)
        per_client: dict[int, dict[str, float]] = {}
        for n, msg in _usable_responses(raw, "evaluation", f"round {r}: ", "ignored"):
            for c, frames in msg.messages.items():
                if self.node_of.get(c) != n or len(frames) != 1:
                    continue
                try:
                    rep = Report.decode(frames[0])
                except wire.WireError as exc:
                    print(f"round {r}: client {c} sent a malformed report ({exc}); ignored", file=sys.stderr)
                    continue
                if rep.client_id == c and rep.round == r:
                    per_client[c] = dict(rep.metrics)
                    if self.options.hook:
                        self.options.hook(c, -1, frames[0])
        return {c: per_client[c] for c in sorted(per_client)}


def _usable_responses(raw: Mapping[int, bytes], what: str, where: str, consequence: str) -> Iterator[tuple[int, NodeMessage]]:
    """Each node's decoded answer; a malformed frame or the node's error report is logged and skipped.

    One node's bad answer costs only its own clients' part in this step, never the run: it is
    said on stderr (``where``, e.g. ``"round 3: "``, then the node, ``what`` it sent, ``consequence``).
    """
    for n, data in raw.items():
        try:
            msg = NodeMessage.decode(data, RESPONSE)
        except wire.WireError as exc:
            print(f"{where}node {n} sent a malformed {what} ({exc}); {consequence}", file=sys.stderr)
            continue
        if "error" in msg.header:
            print(f"{where}node {n} refused the {what}: {msg.header['error']}; {consequence}", file=sys.stderr)
            continue
        yield n, msg


def run_remote_federation(
    config: RunConfig,
    link: NodeLink,
    nodes: Mapping[int, Sequence[int] | None],
    options: RunOptions | None = None,
    *,
    fit_timeout: float = 600.0,
    stage_timeout: float = 60.0,
    on_stage: Callable[[int, str, int], None] | None = None,
    keys_dir: Path | None = None,
) -> Path:
    """Run ``config`` with its clients on ``nodes`` into a fresh run directory; return its path."""
    options = options or RunOptions()
    options = replace(options, data_dir=resolve_data_dir(options.data_dir))
    run = RunDirectory.create(options.out, options.name or f"{config.task.kind}-{config.aggregation.kind}-flower")
    try:
        (run.path / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")
        fed = RemoteFederation(config, run, options, link, nodes, fit_timeout=fit_timeout, stage_timeout=stage_timeout, on_stage=on_stage, keys_dir=keys_dir)
    except BaseException:
        run.discard()
        raise
    return _complete(fed, run, options)
