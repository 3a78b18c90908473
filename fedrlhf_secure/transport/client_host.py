"""The client side of a node: local RLHF, the update codec, and the aggregator's client halves.

Why a long-lived host next to the SuperNode: Flower 1.42 runs every ClientApp message in a fresh
``flwr-clientapp`` process, but a round of secure aggregation is a conversation — a SecAgg
client's ephemeral secret keys and mask seeds, or a CKKS client's secret context, must survive
from one stage to the next, and must never be serialised into Flower's ``Context`` (which the
SuperNode keeps and could write out). The task's private data and each client's personal
parameters also stay loaded for the whole run. So the node's clients live here, in one process
that never listens on the network: the ClientApp (:mod:`.client_app`) relays the bytes of each
Flower Message to it over a Unix socket only the node's user can open.

The host does exactly what the in-process engine does for a client (FedRLHF, arXiv 2412.15538,
Algorithm 1, client part): local fit with the per-(run, round, client) seed, the flat update
vector, the aggregator's client half over that vector; and it reports evaluation numbers. What it
sends out is in the frames it returns and nothing else.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from aggregation import wire
from aggregation.base import ClientHalf, ProtocolError, RoundContext

from ..config import build_config
from ..federation.clients import LocalClients
from ..federation.engine import build_task
from ..federation.messages import FitInstruction, Report
from ..federation.update import UpdateCodec
from ..privacy.budget import BudgetedPlan
from ..privacy.factory import build_plan
from ..privacy.plan import NoPrivacy, PrivacyPlan
from .aggregator_keys import KeyFileError, node_aggregator
from .local_socket import recv_frame, send_frame
from .node_protocol import REQUEST, RESPONSE, NodeMessage


class NodeError(RuntimeError):
    """The node refused a request (wrong order, unknown client, config it cannot run)."""


@dataclass
class _Round:
    ctx: RoundContext
    halves: dict[int, ClientHalf]


class ClientHost:
    """The clients ``client_ids`` of one node, driven by :class:`NodeMessage` requests."""

    def __init__(
        self, client_ids: Sequence[int], data_dir: Path | None, keys_dir: Path | None = None, state_dir: Path | None = None
    ) -> None:
        """``state_dir`` holds this node's privacy ledgers (one folder per run): with DP on, ε is
        accounted and enforced here, on the clients' side, never by the server."""
        if not client_ids or len(set(client_ids)) != len(client_ids):
            raise ValueError(f"a node needs a non-empty list of distinct client ids, got {list(client_ids)}")
        self.client_ids = [int(c) for c in client_ids]
        self.data_dir = data_dir
        self.keys_dir = keys_dir
        self.state_dir = None if state_dir is None else Path(state_dir)
        self.ledger_dir: Path | None = None
        self.config = None
        self.clients: LocalClients | None = None
        self.round: _Round | None = None

    # ------------------------------------------------------------------ requests
    def handle(self, data: bytes) -> bytes:
        """One request's bytes -> the response's bytes; a refusal travels as an ``error`` field."""
        op = "setup"
        try:
            req = NodeMessage.decode(data, REQUEST)
            op = req.op
            resp = getattr(self, f"_{req.op}")(req)
        except (wire.WireError, ProtocolError, NodeError, ValueError, KeyError, KeyFileError) as exc:
            resp = NodeMessage(op, {"error": f"{type(exc).__name__}: {exc}"})
        except Exception as exc:  # a failing task or aggregator must not take the node's other clients down
            traceback.print_exc(file=sys.stderr)
            resp = NodeMessage(op, {"error": f"{type(exc).__name__}: {exc}"})
        return resp.encode(RESPONSE)

    def _setup(self, req: NodeMessage) -> NodeMessage:
        raw = yaml.safe_load(req.blobs.get("config", b"").decode("utf-8"))
        config = build_config(raw, source="<config from the server>")
        if config.privacy.mode == "client" and config.privacy.noise == "central":
            raise NodeError(
                "privacy.noise 'central' adds the noise on the server, which would then hold the privacy plan; "
                "over nodes use privacy.noise: distributed (each node adds its clients' noise shares)"
            )
        if config.privacy.mode != "none" and self.state_dir is None:
            raise NodeError(f"privacy.mode {config.privacy.mode!r} needs a state directory for this node's ledger (--state-dir)")
        everyone = req.int_list("client_ids")
        missing = sorted(set(self.client_ids) - set(everyone))
        if missing:
            raise NodeError(f"this node hosts clients {missing}, which the run does not have")
        self.config = config
        self.task = build_task(config, self.data_dir)
        task_ids = set(self.task.client_ids())
        unknown = sorted(set(self.client_ids) - task_ids)
        if unknown:
            raise NodeError(f"the task has no clients {unknown} (it has {len(task_ids)} clients)")
        self.codec = UpdateCodec(self.task.shared_spec(), config.federation.sparse_rows)
        self.clients = LocalClients(self.task, self.client_ids, self.codec)
        self.aggregator = node_aggregator(config, everyone, self.client_ids, self.keys_dir)
        self.privacy = self._build_privacy(config, len(everyone))
        # CKKS: the server cannot read the aggregate, so the global model is held here (the initial
        # one is public; later ones are what these clients decrypted) and never sent by the server
        self.held: dict[str, np.ndarray] | None = None
        self.held_round = -1
        if not self.aggregator.server_can_read_result:
            self.held = {k: np.asarray(v, dtype=np.float32).copy() for k, v in self.task.initial_shared().items()}
            self.clients.hold_global(self.held)
        # only which clients are here: example counts are FedAvg weights, which masking and CKKS keep
        # from the server (they travel inside the protected vector)
        return NodeMessage("setup", {"clients": list(self.client_ids), "dim": int(self.codec.dim)})

    def _build_privacy(self, config, num_clients: int) -> PrivacyPlan:
        """This node's plan for its own clients: sizes stay here, only the federation's client count is public."""
        if config.privacy.mode == "none":
            return NoPrivacy()
        assert self.state_dir is not None and self.clients is not None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        self.ledger_dir = self.state_dir / "privacy" / f"run-{stamp}-{os.urandom(4).hex()}" / "ledger"
        return build_plan(config, self.clients.num_examples(), self.ledger_dir, False, num_clients=num_clients)

    def _admit(self, req: NodeMessage) -> NodeMessage:
        """The privacy plan's admission, on the node: a client over its budget refuses the round."""
        self._require_setup()
        rnd = req.field("round", int)
        cids = req.int_list("clients")
        foreign = sorted(set(cids) - set(self.client_ids))
        if foreign:
            raise NodeError(f"admission for clients {foreign}, which this node does not host")
        admitted = [c for c in cids if self.privacy.admit(c, rnd)]
        return NodeMessage("admit", {"round": rnd, "admitted": admitted, "epsilon_spent": self._epsilon_spent()})

    def _epsilon_spent(self) -> dict[str, float]:
        """Each hosted client's ε spent so far (a public metric, reported as plaintext)."""
        if isinstance(self.privacy, NoPrivacy):
            return {}
        per_client = self.privacy.summary().get("epsilon_per_client") or {}
        return {str(c): float(per_client.get(str(c), 0.0)) for c in self.client_ids}

    def _require_setup(self) -> LocalClients:
        if self.clients is None or self.config is None:
            raise NodeError("the node has not been set up for a run (no setup request yet)")
        return self.clients

    def _fit(self, req: NodeMessage) -> NodeMessage:
        clients = self._require_setup()
        cids = req.int_list("clients")
        foreign = sorted(set(cids) - set(self.client_ids))
        if foreign:
            raise NodeError(f"fit for clients {foreign}, which this node does not host")
        ctx = RoundContext(
            bytes.fromhex(req.field("session", str)), req.field("round", int), tuple(req.int_list("participants")), req.field("dim", int)
        )
        if ctx.dim != self.codec.dim:
            raise NodeError(f"round {ctx.round}: the server's vector dimension {ctx.dim} differs from this node's {self.codec.dim}")
        instruction = req.blobs["instruction"]
        fit = FitInstruction.decode(instruction, self.task.shared_spec().names())
        if fit.round != ctx.round:
            raise NodeError(f"fit instruction is for round {fit.round}, the round context for {ctx.round}")
        self._check_held(fit)
        if isinstance(self.privacy, BudgetedPlan):
            unadmitted = [c for c in cids if c not in self.privacy.admitted.get(ctx.round, set())]
            if unadmitted:
                raise NodeError(f"round {ctx.round}: clients {unadmitted} were not admitted by this node's privacy plan")
            # the distributed noise share is sized for the round's survivors, a public function of
            # how many clients were admitted federation-wide (the round context's participants)
            self.privacy.admitted[ctx.round] = set(ctx.participants)
        dp = {c: self.privacy.fit_settings(c, ctx.round, clients.clients[c].num_examples()) for c in cids}
        updates = clients.fit(cids, instruction, dp)
        summary: dict[str, Any] = {}
        halves: dict[int, ClientHalf] = {}
        replies: dict[int, list[bytes]] = {}
        weighting = self.config.federation.weighting
        for c in cids:
            up = updates[c]
            weight = float(up.num_examples) if weighting == "examples" else 1.0
            # the plan draws its noise share from os.urandom (privacy.randomness): a generator seeded
            # from the run seed, which config.yaml publishes, would let anyone subtract the noise
            priv = self.privacy.privatize(c, ctx.round, up.vector, weight)
            spent = self.privacy.commit(c, ctx.round, up.privacy)
            halves[c] = self.aggregator.client(ctx, c, priv.vector, priv.weight, **priv.aggregator_kwargs)
            summary[str(c)] = {"metrics": _finite(up.metrics)}
            if spent is not None:
                summary[str(c)]["epsilon_spent"] = float(spent)
        self.round = _Round(ctx, halves)
        for c, msgs in req.messages.items():
            replies[c] = self._deliver(c, msgs)
        return NodeMessage("fit", {"round": ctx.round, "fit": summary}, replies)

    def _deliver(self, cid: int, msgs: list[bytes]) -> list[bytes]:
        if self.round is None or cid not in self.round.halves:
            raise NodeError(f"no aggregation in progress for client {cid} on this node")
        out: list[bytes] = []
        for m in msgs:
            out.extend(self.round.halves[cid].receive(m))
        return out

    def _agg(self, req: NodeMessage) -> NodeMessage:
        self._require_setup()
        self._check_round(req)
        return NodeMessage("agg", {"round": req.field("round", int)}, {c: self._deliver(c, m) for c, m in req.messages.items()})

    def _finish(self, req: NodeMessage) -> NodeMessage:
        """Deliver the server's last messages; a node holding the model applies the aggregate its clients read."""
        self._require_setup()
        self._check_round(req)
        for c, msgs in req.messages.items():
            self._deliver(c, msgs)
        assert self.round is not None
        rnd = self.round.ctx.round
        for c, half in sorted(self.round.halves.items()):
            res = half.result() if half.done else None
            if res is None:
                continue
            if self.held is not None and self.held_round < rnd:
                avg = self.codec.decode(res)
                lr = self.config.federation.server_lr
                self.held = {k: (self.held[k] + lr * avg[k]).astype(np.float32) for k in self.held}
                self.held_round = rnd
                self._require_setup().hold_global(self.held)
            return NodeMessage("finish", {"round": rnd, "contributors": [int(x) for x in res.contributors], "reader": c})
        return NodeMessage("finish", {"round": rnd})

    def _check_held(self, fit: FitInstruction) -> None:
        """A client-held instruction needs this node's copy of the previous round's model."""
        if self.held is None:
            if fit.client_held:
                raise NodeError("the instruction carries no model, but this run's server can read the aggregate")
            return
        if not fit.client_held:
            raise NodeError("the server sent a model although only clients can read the aggregate (CKKS)")
        if self.held_round != fit.round - 1:
            raise NodeError(
                f"round {fit.round}: this node holds the model of round {self.held_round} (it missed an aggregate), "
                "so its clients sit out"
            )

    def _release(self, req: NodeMessage) -> NodeMessage:
        self._require_setup()
        if self.held is None:
            raise NodeError("this node holds no model: the server has it")
        return NodeMessage("release", {"round": self.held_round}, arrays=dict(self.held))

    def _check_round(self, req: NodeMessage) -> None:
        rnd = req.field("round", int)
        if self.round is None or self.round.ctx.round != rnd:
            raise NodeError(f"message for round {rnd}, but this node's round is {None if self.round is None else self.round.ctx.round}")

    def _evaluate(self, req: NodeMessage) -> NodeMessage:
        clients = self._require_setup()
        cids = req.int_list("clients")
        rnd = req.field("round", int)
        fit = FitInstruction.decode(req.blobs["shared"], self.task.shared_spec().names())
        if self.held is not None and (not fit.client_held or self.held_round != rnd):
            raise NodeError(f"round {rnd}: evaluation needs this node's model of round {rnd}, it holds round {self.held_round}")
        metrics = clients.evaluate(req.blobs["shared"], cids)
        self.round = None  # the round's secrets are dropped once it is over
        return NodeMessage("evaluate", {"round": rnd}, {c: [Report(c, rnd, m).encode()] for c, m in metrics.items()})


def _finite(metrics) -> dict[str, float | None]:
    return {k: (float(v) if np.isfinite(v) else None) for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------
# The Unix-socket server the ClientApp relays to
# ---------------------------------------------------------------------------------------------


def serve(host: ClientHost, socket_path: Path, *, ready_file: Path | None = None, max_requests: int | None = None) -> None:
    """Answer requests on ``socket_path`` (mode 0600) until killed (or ``max_requests`` were served)."""
    socket_path = Path(socket_path)
    if socket_path.exists():
        socket_path.unlink()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        srv.bind(str(socket_path))
    finally:
        os.umask(old)
    os.chmod(socket_path, 0o600)
    srv.listen(8)
    if ready_file is not None:
        Path(ready_file).write_text(str(os.getpid()))
    print(f"client host for clients {host.client_ids} listening on {socket_path}", file=sys.stderr, flush=True)
    served = 0
    try:
        while max_requests is None or served < max_requests:
            conn, _ = srv.accept()
            served += 1
            with conn:
                try:
                    data = recv_frame(conn)
                except ConnectionError:
                    continue
                send_frame(conn, host.handle(data))
    finally:
        srv.close()
        if socket_path.exists():
            socket_path.unlink()
