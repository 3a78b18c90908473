"""Driving an aggregator's server half against participants that live on hosts ("nodes").

The aggregator's sans-IO :class:`~aggregation.base.ServerHalf` emits ``(client_id, bytes)``
messages; here they are grouped per node and exchanged in stages through a :class:`NodeLink`:
Flower's Grid in a deployment, direct calls (:mod:`.links`) in the embedded simulation, tests
and benchmarks. A stage ends when every addressed node answered or its deadline
passed; clients whose node did not answer are dropouts, and :meth:`ServerHalf.close_stage` lets
the protocol continue with the survivors (SecAgg's dropout recovery) or abort when too few are
left.

The first exchange merges the fit request with the aggregator's opening messages, so a round
costs one network round trip fewer than "fit, then aggregate".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from aggregation import wire
from aggregation.base import AggregateResult, AggregationAborted, ProtocolError, RoundContext, ServerHalf
from aggregation.driver import SERVER_ID, TranscriptHook

from .node_protocol import REQUEST, NodeMessage, NodeUnusable, client_key, group_by_node, read_response


class NodeLink(Protocol):
    """Sends one request to each of some nodes and returns the responses that came back in time."""

    def exchange(self, requests: Mapping[int, bytes], timeout: float) -> dict[int, bytes]: ...


@dataclass
class StageLog:
    op: str
    nodes_asked: int
    nodes_answered: int
    seconds: float


@dataclass
class NodeRoundOutcome:
    server_result: AggregateResult | None
    client_contributors: tuple[int, ...] | None
    """When only clients can read the aggregate (CKKS): whose updates it sums, as a reader reports."""
    fit: dict[int, dict[str, Any]]
    bytes_up: dict[int, int]
    bytes_down: dict[int, int]
    envelope_bytes: int
    stages: list[StageLog] = field(default_factory=list)
    server_seconds: float = 0.0
    dropped_nodes: set[int] = field(default_factory=set)
    aborted: str | None = None
    """Why the aggregation could not complete (nothing was released), or None."""
    client_discarded: str | None = None
    """When only clients can read the aggregate: why the reader did not use it (too few contributors
    for its noise share), or None."""


logger = logging.getLogger(__name__)


def _log(msg: str) -> None:
    logger.warning(msg)


class NodeRoundDriver:
    """One aggregation round over nodes; ``node_of[client] = node`` says where each client lives."""

    def __init__(
        self,
        link: NodeLink,
        node_of: Mapping[int, int],
        *,
        fit_timeout: float,
        stage_timeout: float,
        hook: TranscriptHook | None = None,
        on_stage: Callable[[int, str, int], None] | None = None,
    ) -> None:
        self.link = link
        self.node_of = dict(node_of)
        self.fit_timeout = fit_timeout
        self.stage_timeout = stage_timeout
        self.hook = hook
        self.on_stage = on_stage
        """``on_stage(round, op, stage_index)`` after each stage's replies are in (fault-injection tests)."""

    def _exchange(
        self, out: NodeRoundOutcome, op: str, rnd: int, per_node: Mapping[int, NodeMessage], timeout: float
    ) -> dict[int, NodeMessage]:
        t0 = time.perf_counter()
        requests = {n: m.encode(REQUEST) for n, m in per_node.items() if n not in out.dropped_nodes}
        for m in per_node.values():
            for cid, msgs in m.messages.items():
                out.bytes_down[cid] = out.bytes_down.get(cid, 0) + sum(len(x) for x in msgs)
                if self.hook:
                    for x in msgs:
                        self.hook(SERVER_ID, cid, x)
        out.envelope_bytes += sum(len(b) for b in requests.values())
        raw = self.link.exchange(requests, timeout) if requests else {}
        replies: dict[int, NodeMessage] = {}
        for n in requests:
            data = raw.get(n)
            if data is None:
                _log(f"round {rnd}: node {n} did not answer the {op} stage in {timeout:.0f} s; its clients drop out")
                out.dropped_nodes.add(n)
                continue
            out.envelope_bytes += len(data)
            try:
                msg = read_response(data, f"{op} stage")
            except NodeUnusable as exc:  # one node's bad or refused answer is that node's failure
                _log(f"round {rnd}: node {n} {exc}; its clients drop out")
                out.dropped_nodes.add(n)
                continue
            foreign = [c for c in msg.messages if self.node_of.get(c) != n]
            if foreign:
                _log(f"round {rnd}: node {n} answered for clients {foreign} it does not host; ignored")
                msg = NodeMessage(msg.op, msg.header, {c: v for c, v in msg.messages.items() if c not in foreign}, msg.blobs, msg.arrays)
            replies[n] = msg
        out.stages.append(StageLog(op, len(requests), len(replies), time.perf_counter() - t0))
        return replies

    def _feed(self, out: NodeRoundOutcome, server: ServerHalf, replies: Mapping[int, NodeMessage], rnd: int) -> list[tuple[int, bytes]]:
        nxt: list[tuple[int, bytes]] = []
        for n in sorted(replies):
            for cid in sorted(replies[n].messages):
                for data in replies[n].messages[cid]:
                    out.bytes_up[cid] = out.bytes_up.get(cid, 0) + len(data)
                    if self.hook:
                        self.hook(cid, SERVER_ID, data)
                    t0 = time.perf_counter()
                    try:
                        nxt.extend(server.receive(cid, data))
                    except (ProtocolError, wire.WireError) as exc:  # one client's bad message costs only that message
                        _log(f"round {rnd}: message from client {cid} rejected: {exc}")
                    out.server_seconds += time.perf_counter() - t0
        return nxt

    def run(
        self,
        server: ServerHalf,
        ctx: RoundContext,
        instruction: bytes,
        *,
        server_can_read_result: bool,
        model_round: int | None = None,
        clip_counts: list | None = None,
    ) -> NodeRoundOutcome:
        rnd = ctx.round
        out = NodeRoundOutcome(None, None, {}, {c: 0 for c in ctx.participants}, {c: 0 for c in ctx.participants}, 0)
        t0 = time.perf_counter()
        opening = server.start()
        out.server_seconds += time.perf_counter() - t0

        by_node: dict[int, list[int]] = {}
        for c in ctx.participants:
            by_node.setdefault(self.node_of[c], []).append(c)
        grouped = group_by_node(opening, self.node_of)
        header = {"round": rnd, "session": ctx.session_id.hex(), "participants": list(ctx.participants), "dim": ctx.dim}
        if model_round is not None:
            header["model_round"] = model_round  # the round whose aggregate the fit starts from (-1: the initial model)
        if clip_counts:
            header["clip_counts"] = clip_counts  # adaptive clipping: the released noised counts, from which each host derives C_t
        fit_requests = {
            n: NodeMessage("fit", {**header, "clients": cids}, grouped.get(n, {}), {"instruction": instruction})
            for n, cids in by_node.items()
        }
        replies = self._exchange(out, "fit", rnd, fit_requests, self.fit_timeout)
        for n, msg in replies.items():
            summary = msg.header.get("fit", {})
            if not isinstance(summary, dict):
                _log(f"round {rnd}: node {n} sent a fit summary that is not a mapping; its clients' metrics are ignored")
                continue
            for c, info in summary.items():
                cid = client_key(c)
                if cid is not None and self.node_of.get(cid) == n and isinstance(info, dict):
                    if not isinstance(info.get("metrics", {}), dict):
                        _log(f"round {rnd}: node {n} sent client {cid}'s metrics as {type(info['metrics']).__name__}; ignored")
                        info = {k: v for k, v in info.items() if k != "metrics"}
                    out.fit[cid] = info
        stage = 0
        try:
            pending = self._feed(out, server, replies, rnd)
            if self.on_stage:
                self.on_stage(rnd, "fit", stage)
            while not server.done:
                if pending:
                    stage += 1
                    grouped = group_by_node(pending, self.node_of)
                    reqs = {n: NodeMessage("agg", {"round": rnd}, msgs) for n, msgs in grouped.items()}
                    replies = self._exchange(out, "agg", rnd, reqs, self.stage_timeout)
                    pending = self._feed(out, server, replies, rnd)
                    if self.on_stage:
                        self.on_stage(rnd, "agg", stage)
                    continue
                t0 = time.perf_counter()
                pending = server.close_stage()
                out.server_seconds += time.perf_counter() - t0
                if not pending and not server.done:
                    raise AggregationAborted("protocol stalled: no message in flight and the server is not done")

        except AggregationAborted as exc:
            # too few clients left to finish (below the masking threshold, or no update at all): the
            # round releases nothing; the outcome still reports what the stages cost
            out.aborted = str(exc)
            return out
        out.server_result = server.result()
        # Deliver the server's last messages (e.g. the CKKS aggregate). When only clients can read the
        # result, every node still up is told the round is over: the ones whose clients decrypted it
        # apply it to the model they hold and say whose updates it sums; nothing else comes back.
        grouped = group_by_node(pending, self.node_of)
        if not server_can_read_result:
            alive = {self.node_of[c] for c in ctx.participants} - out.dropped_nodes
            for n in alive:
                grouped.setdefault(n, {})
        if grouped:
            reqs = {n: NodeMessage("finish", {"round": rnd}, msgs) for n, msgs in grouped.items()}
            replies = self._exchange(out, "finish", rnd, reqs, self.stage_timeout)
            for n in sorted(replies):
                if "contributors" in replies[n].header:
                    try:
                        out.client_contributors = tuple(replies[n].int_list("contributors"))
                        discarded = replies[n].header.get("discarded")
                        out.client_discarded = str(discarded) if discarded is not None else None
                    except wire.WireError as exc:
                        _log(f"round {rnd}: node {n} sent malformed contributors ({exc}); ignored")
                        continue
                    break
        return out
