"""The client's side of a round, in one place: task → privacy layer → aggregator's client half.

FedRLHF (arXiv 2412.15538), Algorithm 1, client part. A :class:`Participant` is one client: its
task state (private data, human feedback, personal parameters), its own half of the privacy plan
(:class:`~fedrlhf_secure.privacy.plan.ClientPrivacy`: clipping, noise share, DP-SGD settings, the
ledger) and, for the round in progress, the aggregator's client half. :meth:`Participant.release`
is the pipeline a reader can check in one place, in the spirit of Flower's client mods
(``LocalDpMod``, ``secaggplus_mod``): privacy is a visible layer around the client's work, and
every step before the last runs before any byte of the update exists outside the client::

    local RLHF (task) → flat update → clip → [audit canaries] → noise → ledger commit → mask / encrypt

A :class:`ParticipantHost` holds the participants of one place — the embedded simulation's
process, one ``--workers`` process, or a deployment node beside a Flower SuperNode — and speaks
the node protocol (:mod:`.node_protocol`): it takes the round core's request frames and returns
response frames, bytes in and bytes out. The in-process runner and the Flower client host drive
this same class, so there is one implementation of the client's side of a round.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from aggregation import wire
from aggregation.base import Aggregator, ClientHalf, ProtocolError, RoundContext

from ..config import RunConfig, build_config
from ..errors import FedRLHFError, InputError
from ..privacy.adaptive_clipping import MAX_HISTORY, CountRelease
from ..privacy.canaries import audit_block_size, build_canaries
from ..privacy.factory import build_client_privacy
from ..privacy.noise import NoiseSource
from ..privacy.plan import ClientPrivacy, NoClientPrivacy
from ..tasks.base import FitConfig, FitResult, Task, TaskClient, task_spec
from . import aggregators
from .audit_block import with_audit_block
from .messages import FitInstruction, Report
from .node_protocol import REQUEST, RESPONSE, NodeMessage
from .policy import NodePolicy, PolicyRefused
from .server_optimizer import ServerOptimizer
from .update import UpdateCodec

logger = logging.getLogger(__name__)

CommitHook = Callable[[int, int], None]
"""``on_commit(client, round)`` right after a ledger commit (tests inject crash points here)."""


class NodeError(FedRLHFError):
    """A participant host refused a request (wrong order, unknown client, a config it cannot run)."""


def client_seed(run_seed: int, round: int, cid: int) -> int:
    """Per-(run, round, client) seed of the task's non-private randomness: the same config and seed
    give the same training anywhere (DP noise never comes from it: :mod:`fedrlhf_secure.privacy.noise`)."""
    return int(np.random.SeedSequence([run_seed, round, cid]).generate_state(1)[0] & 0x7FFFFFFF)


def build_task(config: RunConfig, data_dir: Path | None) -> Task:
    """The config's task; with ``privacy.audit_canaries`` in an audit block, its shared parameters
    carry the block (:func:`.audit_block.with_audit_block`)."""
    spec = task_spec(config.task.kind)
    return with_audit_block(spec.factory(config.task.params, data_dir, config.seed), audit_block_size(config))


def _split_metrics(metrics: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    """Numbers go in the report to the server; anything else (e.g. sample generations) stays local."""
    numeric, other = {}, {}
    for k, v in metrics.items():
        if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool):
            numeric[k] = float(v)
        else:
            other[k] = v
    return numeric, other


def _finite(metrics: Mapping[str, float]) -> dict[str, float | None]:
    """JSON has no NaN: a non-finite metric (an undefined correlation) travels as null."""
    return {k: (float(v) if np.isfinite(v) else None) for k, v in metrics.items()}


TRAINING_PREFIX = "train_"
"""Task contract: an evaluation number whose key starts with ``train_`` was computed on training data."""

LOCAL_METRICS_FILE = "client_metrics.jsonl"
"""The client-side file (in the host's own folder) where evaluation numbers stay under DP."""


@dataclass(frozen=True)
class PlaintextPolicy:
    """What of a client's own numbers may leave it in plaintext: the one generic filter every task's
    metrics pass through on their way out of a participant (MovieLens, IMDb, any new task alike).

    Without DP (``private=False``) fit metrics and evaluation numbers go to the server as before.
    Under any DP mode nothing computed from a client's data leaves it un-noised: the DP guarantee
    covers the released update only, and a loss, a count or an accuracy computed on the client's
    records (with its noiseless personal parameters) is a non-private function of them (even ``n``
    would void add/remove-one DP). So under DP:

    * fit metrics (training loss, step counts) are dropped: the fit summary carries none;
    * evaluation numbers keep only those computed on held-out data (keys not starting with
      :data:`TRAINING_PREFIX`) and stay on the client, in its own file :data:`LOCAL_METRICS_FILE`;
      the ``fed/report`` frame carries no metrics (the server learns that the client answered).

    The ε a client has spent still travels (it is a function of the public σ, q, step counts and
    the rounds the server itself saw the client take part in, under replace-one where n is public).
    """

    private: bool

    @classmethod
    def of(cls, config: RunConfig) -> PlaintextPolicy:
        return cls(private=config.privacy.mode != "none")

    def fit_metrics(self, metrics: Mapping[str, float]) -> dict[str, float | None]:
        return {} if self.private else _finite(metrics)

    def evaluation(self, numbers: Mapping[str, float]) -> tuple[dict[str, float], dict[str, float]]:
        """(numbers for the server's report, numbers kept in the client's own file)."""
        if not self.private:
            return dict(numbers), {}
        return {}, {k: float(v) for k, v in numbers.items() if not k.startswith(TRAINING_PREFIX)}


@dataclass
class FitOutcome:
    """What a participant's fit leaves behind: the aggregator half holding its release, and the
    numbers it reports (training metrics, ε spent)."""

    half: ClientHalf
    metrics: dict[str, float]
    epsilon_spent: float | None


class Participant:
    """One client: its task state, its privacy layer and its part of each round."""

    def __init__(
        self,
        client_id: int,
        task_client: TaskClient,
        codec: UpdateCodec,
        privacy: ClientPrivacy,
        weighting: str,
        on_commit: CommitHook | None = None,
    ) -> None:
        self.client_id = client_id
        self.task_client = task_client
        self.codec = codec
        self.privacy = privacy
        self.weighting = weighting
        self.on_commit = on_commit

    def fit_config(self, fit: FitInstruction) -> FitConfig:
        """What this client's local RLHF is asked to do in the round of ``fit``."""
        cid, r = self.client_id, fit.round
        dp_sgd = self.privacy.dpsgd_settings(cid, r)
        if self.privacy.canaries is not None:  # record level: the audit canaries go in inside each DP-SGD step
            dp_sgd = self.privacy.canaries.for_dpsgd(cid, dp_sgd)
        return FitConfig(round=r, local_epochs=fit.local_epochs, seed=client_seed(fit.seed, r, cid), dp_sgd=dp_sgd)

    def release(
        self,
        shared: Mapping[str, np.ndarray],
        fit: FitInstruction,
        ctx: RoundContext,
        aggregator: Aggregator,
        result: FitResult | None = None,
    ) -> FitOutcome:
        """Local RLHF (or its ``result``, when the host trained this client together with others:
        :meth:`~fedrlhf_secure.tasks.base.Task.fit_clients` of ``fit_config(fit)``), then the privacy
        layer, then the aggregator's client half: the only way an update leaves a client."""
        cid, r = self.client_id, fit.round
        # 1. local RLHF with the client's own shaped reward R_k = R0_k + λ_k·H_k (DP-SGD inside when record-level)
        if result is None:
            result = self.task_client.fit(shared, self.fit_config(fit))
        update = self.codec.encode(result)
        weight = float(result.num_examples) if self.weighting == "examples" else 1.0
        # 2. privacy layer: clip → noise (or the release stored before a crash, sent again unchanged)
        release = self.privacy.replayed(cid, r)
        if release is None:
            clipped = self.privacy.clip(update)
            clipped = self.privacy.insert_canaries(cid, r, clipped)  # audit canaries (privacy.audit_canaries) go in before the noise
            release = self.privacy.add_noise(cid, r, clipped, weight)
        # 3. ledger commit, fsync'd, before anything is handed to the aggregator
        spent = self.privacy.commit(cid, r, release, result.dp_sgd)
        if self.on_commit is not None:
            self.on_commit(cid, r)
        # 4. mask / encrypt: the aggregator's client half is the only holder of the release from here on
        half = aggregator.client(ctx, cid, release.vector, release.weight, integer_noise=release.integer_noise)
        return FitOutcome(half, dict(result.metrics), spent)

    def evaluate(self, shared: Mapping[str, np.ndarray]) -> tuple[dict[str, float], dict[str, Any]]:
        """The task's evaluation numbers and client-side artefacts (sample generations, kept here); the
        host's :class:`PlaintextPolicy` decides which numbers may reach the server."""
        return _split_metrics(self.task_client.evaluate(shared))


@dataclass
class _Round:
    ctx: RoundContext
    halves: dict[int, ClientHalf]


class ParticipantHost:
    """The participants of one place, driven by :class:`~.node_protocol.NodeMessage` requests.

    ``task`` and ``aggregator`` may be handed in by the embedded simulation (the same objects the
    server side was built with: CKKS's simulated key dealer, a prepared audit task); a deployment
    node builds both from the setup request and its own key directory. ``ledger_dir`` (in process)
    or ``state_dir`` (on a node) is where the participants' privacy ledger lives: with DP on, ε is
    accounted and enforced here, on the clients' side, never by the server.

    ``policy``: the participants' own :class:`~.policy.NodePolicy`, which the server cannot see or
    change: a setup (or a round) asking for less protection is refused, and the node, not the
    server, chooses its identity registry and ledger folder. In process it is the user's own config
    (:meth:`NodePolicy.from_config`); on a deployment node, the node's policy file.

    ``embedded``: the host shares a process with the server of a simulation. A failure of the
    clients' own work (a privacy violation, a task error) then ends the run, as it would on a
    single machine, instead of being reported as one node's failure; and ``privacy.noise:
    central`` is accepted (a deployment node refuses it: the server would see the un-noised sum).
    """

    def __init__(
        self,
        client_ids: Sequence[int],
        data_dir: Path | None = None,
        keys_dir: Path | None = None,
        state_dir: Path | None = None,
        *,
        policy: NodePolicy,
        task: Task | None = None,
        aggregator: Aggregator | None = None,
        ledger_dir: Path | None = None,
        artifacts_dir: Path | None = None,
        resume: bool = False,
        noise: NoiseSource | None = None,
        on_commit: CommitHook | None = None,
        embedded: bool = False,
        on_client_fit: Callable[[int], None] | None = None,
    ) -> None:
        if not client_ids or len(set(client_ids)) != len(client_ids):
            raise InputError(f"a participant host needs a non-empty list of distinct client ids, got {list(client_ids)}")
        if not isinstance(policy, NodePolicy):
            raise InputError(f"a participant host needs its own NodePolicy, got {type(policy).__name__}")
        self.client_ids = [int(c) for c in client_ids]
        self.policy = policy
        self.data_dir = data_dir
        self.keys_dir = keys_dir
        self.state_dir = None if state_dir is None else Path(state_dir)
        self.ledger_dir = None if ledger_dir is None else Path(ledger_dir)
        self.artifacts_dir = None if artifacts_dir is None else Path(artifacts_dir)
        self.resume = resume
        self.noise = noise
        self.on_commit = on_commit
        self.embedded = embedded
        self.on_client_fit = on_client_fit
        """Called with a client id after each client's release (the embedded run's progress within a round)."""
        self._task = task
        self._aggregator = aggregator
        self.config: RunConfig | None = None
        self.participants: dict[int, Participant] = {}
        self.round: _Round | None = None
        self.held: dict[str, np.ndarray] | None = None
        self.held_round = -1

    # ------------------------------------------------------------------ requests
    def handle(self, data: bytes) -> bytes:
        """One request's bytes -> the response's bytes; a refusal travels as an ``error`` field."""
        op = "setup"
        try:
            req = NodeMessage.decode(data, REQUEST)
            op = req.op
            resp = getattr(self, f"_{req.op}")(req)
        except (wire.WireError, ProtocolError, NodeError, PolicyRefused, InputError, ValueError, KeyError) as exc:
            if self.embedded and not isinstance(exc, (wire.WireError, ProtocolError, NodeError, PolicyRefused)):
                raise
            resp = NodeMessage(op, {"error": f"{type(exc).__name__}: {exc}"})
        except Exception as exc:  # a failing task or aggregator must not take a node's other clients down
            if self.embedded:
                raise
            logger.exception("participant host: %s request failed", op)
            resp = NodeMessage(op, {"error": f"{type(exc).__name__}: {exc}"})
        return resp.encode(RESPONSE)

    def _setup(self, req: NodeMessage) -> NodeMessage:
        everyone = req.int_list("client_ids")
        if "config" not in req.blobs:
            raise NodeError("the setup request carries no run config")
        try:
            raw = yaml.safe_load(req.blobs["config"].decode("utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            raise NodeError(f"the server's run config is not UTF-8 YAML ({exc})") from exc
        config = self._policy_admits(build_config(raw, source="<config from the server>"), everyone)
        central = (config.privacy.mode == "client" and config.privacy.noise == "central") or (
            config.privacy.mode == "record" and config.privacy.record_noise == "central"
        )
        if central and not self.embedded:
            raise NodeError(
                "privacy.noise 'central' adds the noise on the server, which then sees the un-noised sum; "
                "over nodes use privacy.noise: distributed (each node adds its clients' noise shares)"
            )
        if config.privacy.mode != "none" and self.state_dir is None and self.ledger_dir is None:
            raise NodeError(f"privacy.mode {config.privacy.mode!r} needs a state directory for this node's ledger (--state-dir)")
        missing = sorted(set(self.client_ids) - set(everyone))
        if missing:
            raise NodeError(f"this node hosts clients {missing}, which the run does not have")
        task = self._task if self._task is not None else build_task(config, self.data_dir)
        task_ids = set(task.client_ids())
        unknown = sorted(set(self.client_ids) - task_ids)
        if unknown:
            raise NodeError(f"the task has no clients {unknown} (it has {len(task_ids)} clients)")
        self.config = config
        self.task = task
        self.names = task.shared_spec().names()
        self.codec = UpdateCodec.for_federation(task.shared_spec(), config.federation, count_slot=config.privacy.adaptive_clip is not None)
        if self._aggregator is not None:
            self.aggregator = self._aggregator
        else:
            self.aggregator = aggregators.node_aggregator(config, everyone, self.client_ids, self.keys_dir)
        self.plaintext = self._plaintext_policy(config)
        task_clients = {c: task.make_client(c) for c in self.client_ids}
        self.privacy = self._build_privacy(config, {c: tc.num_examples() for c, tc in task_clients.items()}, len(everyone))
        self.privacy.canaries = build_canaries(config, everyone, self.client_ids, self.codec, self.ledger_dir, self.resume)
        self.participants = {
            c: Participant(c, tc, self.codec, self.privacy, config.federation.weighting, self.on_commit) for c, tc in task_clients.items()
        }
        # CKKS: the server cannot read the aggregate, so the global model is held here (the initial
        # one is public; later ones are what these clients decrypted) and never sent by the server
        self.held, self.held_round = None, -1
        self.server_opt = ServerOptimizer(config.federation.server_optimizer, config.federation.server_lr)
        if not self.aggregator.server_can_read_result:
            self.held = {k: np.asarray(v, dtype=np.float32).copy() for k, v in task.initial_shared().items()}
        # only which clients are here: example counts are FedAvg weights, which masking and CKKS keep
        # from the server (they travel inside the protected vector)
        return NodeMessage("setup", {"clients": list(self.client_ids), "dim": int(self.codec.dim)})

    def _policy_admits(self, config: RunConfig, everyone: Sequence[int]) -> RunConfig:
        """The server's config as this node will run it, or :class:`PolicyRefused` (see :mod:`.policy`)."""
        return self.policy.admit_setup(config, len(everyone), embedded=self.embedded)

    def _policy_admits_round(self, config: RunConfig, ctx: RoundContext) -> None:
        self.policy.admit_round(config, len(ctx.participants))

    def _plaintext_policy(self, config: RunConfig) -> PlaintextPolicy:
        """What of its clients' numbers this host lets out in plaintext (:class:`PlaintextPolicy`)."""
        return PlaintextPolicy.of(config)

    def _build_privacy(self, config: RunConfig, sizes: dict[int, int], num_clients: int) -> ClientPrivacy:
        """This host's half of the plan for its own clients: sizes stay here, only the client count is public."""
        if config.privacy.mode == "none":
            return NoClientPrivacy()
        if self.ledger_dir is None:
            assert self.state_dir is not None
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            self.ledger_dir = self.state_dir / "privacy" / f"run-{stamp}-{os.urandom(4).hex()}" / "ledger"
        return build_client_privacy(config, sizes, self.ledger_dir, self.resume, self.aggregator, num_clients=num_clients, noise=self.noise)

    def _require_setup(self) -> RunConfig:
        if self.config is None:
            raise NodeError("the node has not been set up for a run (no setup request yet)")
        return self.config

    def _own(self, cids: Sequence[int], what: str) -> None:
        foreign = sorted(set(cids) - set(self.client_ids))
        if foreign:
            raise NodeError(f"{what} for clients {foreign}, which this node does not host")

    def _admit(self, req: NodeMessage) -> NodeMessage:
        """The privacy plan's admission, here: a client over its budget refuses the round."""
        self._require_setup()
        rnd = req.field("round", int)
        cids = req.int_list("clients")
        self._own(cids, "admission")
        admitted = [c for c in cids if self.privacy.admit(c, rnd)]
        return NodeMessage("admit", {"round": rnd, "admitted": admitted, "epsilon_spent": self._epsilon_spent()})

    def _epsilon_spent(self) -> dict[str, float]:
        """Each hosted client's ε spent so far (public metadata, reported as plaintext)."""
        if self.privacy.mode == "none":
            return {}
        return {str(c): float(self.privacy.spent(c) or 0.0) for c in self.client_ids}

    def _fit(self, req: NodeMessage) -> NodeMessage:
        config = self._require_setup()
        cids = req.int_list("clients")
        self._own(cids, "fit")
        ctx = _round_context(req)
        if ctx.dim != self.codec.dim:
            raise NodeError(f"round {ctx.round}: the server's vector dimension {ctx.dim} differs from this node's {self.codec.dim}")
        self._policy_admits_round(config, ctx)
        fit = FitInstruction.decode(req.blob("instruction"), self.names)
        if fit.round != ctx.round:
            raise NodeError(f"fit instruction is for round {fit.round}, the round context for {ctx.round}")
        shared = self._shared(fit)
        model_round = req.header.get("model_round", fit.round - 1)
        if self.held is not None and self.held_round != model_round:
            raise NodeError(
                f"round {fit.round}: this node holds the model of round {self.held_round} (it missed an aggregate), so its clients sit out"
            )
        if config.privacy.mode != "none":
            unadmitted = [c for c in cids if c not in getattr(self.privacy, "admitted", {}).get(ctx.round, set())]
            if unadmitted:
                raise NodeError(f"round {ctx.round}: clients {unadmitted} were not admitted by this node's privacy plan")
        # the distributed noise share is sized for the round's survivors, a public function of how
        # many clients take part federation-wide (the round context's participants)
        # adaptive clipping: C_t is this host's own function of the released counts (refused if the
        # server rewrites one it sent before, or sends counts to a fixed-clip plan)
        self.privacy.observe_counts(ctx.round, _count_history(req.header.get("clip_counts", [])))
        self.privacy.begin_round(ctx.round, len(ctx.participants))
        summary: dict[str, Any] = {}
        halves: dict[int, ClientHalf] = {}
        # the host's clients train together (a task may batch them), then each releases its own update
        progress = None if self.on_client_fit is None else (lambda i: self.on_client_fit(cids[i]))
        fitted = self.task.fit_clients(
            [(self.participants[c].task_client, self.participants[c].fit_config(fit)) for c in cids], shared, progress
        )
        for c, result in zip(cids, fitted, strict=True):
            out = self.participants[c].release(shared, fit, ctx, self.aggregator, result)
            halves[c] = out.half
            summary[str(c)] = {"metrics": self.plaintext.fit_metrics(out.metrics)}
            if out.epsilon_spent is not None:
                summary[str(c)]["epsilon_spent"] = float(out.epsilon_spent)
        self.round = _Round(ctx, halves)
        replies = {c: self._deliver(c, msgs) for c, msgs in req.messages.items()}
        return NodeMessage("fit", {"round": ctx.round, "fit": summary}, replies)

    def _shared(self, fit: FitInstruction) -> Mapping[str, np.ndarray]:
        """The global model a fit or evaluation starts from: the server's, or (CKKS) the one held here."""
        if self.held is None:
            if fit.client_held:
                raise NodeError("the instruction carries no model, but this run's server can read the aggregate")
            return fit.shared
        if not fit.client_held:
            raise NodeError("the server sent a model although only clients can read the aggregate (CKKS)")
        return self.held

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
        """Deliver the server's last messages; a host holding the model applies the aggregate its clients read."""
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
            header: dict[str, Any] = {"round": rnd, "contributors": [int(x) for x in res.contributors], "reader": c}
            need = self.privacy.minimum_contributors(rnd)
            if len(res.contributors) < need:
                # the clients' distributed noise was sized for `need` survivors: fewer carry too little
                # noise, so the aggregate is not used (the server's half discards it likewise)
                header["discarded"] = f"{len(res.contributors)} contributors but the noise shares were sized for {need}"
            elif self.held is not None and len(set(res.contributors)) < self.policy.ckks.min_contributors:
                # one client's own ciphertext returned as "the aggregate" would decrypt to its update:
                # this node's policy uses no aggregate of fewer distinct clients
                header["discarded"] = (
                    f"{len(set(res.contributors))} contributors, below this node's policy ckks.min_contributors = "
                    f"{self.policy.ckks.min_contributors}"
                )
            elif self.held is not None and self.held_round < rnd:
                self.held = self.server_opt.apply(self.held, self.codec, res)
                self.held_round = rnd
            return NodeMessage("finish", header)
        return NodeMessage("finish", {"round": rnd})

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
        self._require_setup()
        cids = req.int_list("clients")
        self._own(cids, "evaluation")
        rnd = req.field("round", int)
        fit = FitInstruction.decode(req.blob("shared"), self.names)
        model_round = req.header.get("model_round", rnd)
        if self.held is not None and self.held_round != model_round:
            raise NodeError(f"round {rnd}: evaluation needs this node's model of round {model_round}, it holds round {self.held_round}")
        shared = self._shared(fit)
        reports: dict[int, list[bytes]] = {}
        for c in cids:
            numbers, artefacts = self.participants[c].evaluate(shared)
            sent, kept = self.plaintext.evaluation(numbers)
            reports[c] = [Report(c, rnd, sent).encode()]
            if kept:
                self._file_local(LOCAL_METRICS_FILE, {"round": rnd, "client": c, "metrics": _finite(kept)})
            if artefacts:
                self._file_artefacts(rnd, c, artefacts)
        self.round = None  # the round's secrets are dropped once it is over
        return NodeMessage("evaluate", {"round": rnd}, reports)

    def _file_artefacts(self, rnd: int, cid: int, artefacts: Mapping[str, Any]) -> None:
        """Client-side artefacts (sample generations) never travel in a frame: they are filed here."""
        self._file_local("samples.jsonl", {"round": rnd, "client": cid, **artefacts})

    def _file_local(self, name: str, row: Mapping[str, Any]) -> None:
        """Append one JSON line to a file in this host's own folder (the run directory in the embedded
        simulation, which plays the clients' disk; the node's state directory in a deployment)."""
        folder = self.artifacts_dir or (self.ledger_dir.parent if self.ledger_dir is not None else self.state_dir)
        if folder is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / name, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, default=str) + "\n")

    # ------------------------------------------------------------------ the host's own checkpoint
    def client_state(self) -> dict[str, np.ndarray]:
        """Everything a resumed run needs from this host: personal parameters and (CKKS) the held model.
        Written by the embedded simulation into the run's checkpoint, never sent to the server."""
        out = {f"personal/{c}/{k}": v for c, p in self.participants.items() for k, v in p.task_client.personal_state().items()}
        if self.held is not None:
            out.update({f"held/{k}": v for k, v in self.held.items()})
            out["held_round"] = np.asarray([self.held_round], dtype=np.int64)
            out.update({f"opt/{k}": v for k, v in self.server_opt.state().items()})
        return out

    def restore_client_state(self, tensors: Mapping[str, np.ndarray]) -> None:
        personal: dict[int, dict[str, np.ndarray]] = {}
        held: dict[str, np.ndarray] = {}
        opt: dict[str, np.ndarray] = {}
        for key, arr in tensors.items():
            kind, _, rest = key.partition("/")
            if kind == "personal":
                cid, _, name = rest.partition("/")
                if int(cid) in self.participants:
                    personal.setdefault(int(cid), {})[name] = arr
            elif kind == "held":
                held[rest] = arr
            elif kind == "opt":
                opt[rest] = arr
        for cid, state in personal.items():
            self.participants[cid].task_client.load_personal_state(state)
        if held and self.held is not None:
            self.held = {k: np.asarray(v, dtype=np.float32) for k, v in held.items()}
            self.held_round = int(tensors["held_round"][0])
            self.server_opt.load_state(opt)


def _count_history(raw: Any) -> list[CountRelease]:
    """The fit request's released clip counts, checked (a request is a peer's bytes)."""
    if not isinstance(raw, list) or len(raw) > MAX_HISTORY:
        raise NodeError(f"fit: clip_counts must be a list of at most {MAX_HISTORY} released counts")
    try:
        return [CountRelease.parse(item) for item in raw]
    except ValueError as exc:
        raise NodeError(f"fit: {exc}") from exc


def _round_context(req: NodeMessage) -> RoundContext:
    """The round context a fit request states, checked field by field (a request is a peer's bytes)."""
    session = req.field("session", str)
    if len(session) != 32 or not all(ch in "0123456789abcdef" for ch in session):
        raise NodeError(f"fit: session must be 32 lowercase hex digits, got {session[:40]!r}")
    try:
        return RoundContext(bytes.fromhex(session), req.field("round", int), tuple(req.int_list("participants")), req.field("dim", int))
    except ValueError as exc:  # RoundContext's own checks: distinct, non-empty participants, a positive dim
        if isinstance(exc, wire.WireError):
            raise
        raise NodeError(f"fit: {exc}") from exc
