"""The adversary's workbench: the real participants and protocol halves, driven by a lying server.

Nothing here re-implements a client. Updates come from the real participant pipeline
(:class:`~fedrlhf_secure.federation.participant.Participant`: task fit → privacy layer →
aggregator client half) over a synthetic task of the round's size, and every client half is the
real state machine the configuration builds (:func:`~fedrlhf_secure.federation.aggregators.build_aggregator`).
The adversary sits where the server sits: it chooses what each client receives, and it may also
control colluding clients (it then knows their whole state).

Two tools make the split-view attacks generic, independent of how many stages the protocol has:

* :class:`SecAggRun` drives one real SecAgg round honestly until every client has produced its
  masked input, then keeps that state so it can be forked (``copy.deepcopy`` of the sans-IO
  halves);
* :func:`drive_world` continues a fork with a chosen set of clients and the adversary's tampering
  hooks, through whatever stages the protocol has (a consistency round included), recording every
  frame a client sent.

:func:`unmask_individual` is what a server that has recovered a victim's two secrets does with its
masked input (Bonawitz et al., CCS 2017, §4: ``y_u − PRG(b_u) − Σ ±PRG(s_uv)``).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aggregation import wire
from aggregation.base import AggregationAborted, Aggregator, ClientHalf, ProtocolError, RoundContext, ServerHalf
from fedrlhf_secure.config import RunConfig, build_config
from fedrlhf_secure.federation.aggregators import build_aggregator
from fedrlhf_secure.federation.messages import FitInstruction
from fedrlhf_secure.federation.participant import Participant, ParticipantHost
from fedrlhf_secure.federation.update import UpdateCodec
from fedrlhf_secure.privacy.plan import NoClientPrivacy
from fedrlhf_secure.tasks.base import FitConfig, FitResult, ParamEntry, ParamSpec, Task, TaskClient

Tamper = Callable[[int, bytes], bytes | None]
"""``hook(client, frame) -> frame`` (None: drop it): the adversary's hand on one message."""


# ---------------------------------------------------------------------------------------------
# The target: the user's configuration, and a synthetic task of its round size
# ---------------------------------------------------------------------------------------------


@dataclass
class Target:
    """What the suite attacks: the user's resolved config, the round size ``n`` and vector length ``dim``.

    The attacks need no real training: the victim's update is a synthetic vector of ``dim`` values
    (the protocols treat every coordinate alike), made by the real participant pipeline.
    """

    config: RunConfig
    n: int
    dim: int = 64
    workdir: Path = field(default_factory=lambda: Path("."))
    n_source: str = "given"
    host_factory: Callable[..., ParticipantHost] | None = None
    """Builds a deployment node's participant host (tests pass a weakened one); default :func:`honest_node`."""
    aggregator_factory: Callable[[RunConfig, list[int]], Aggregator] | None = None
    """Builds the aggregator of a config (tests pass a weakened one); default the registry's factory."""
    node_socket: Path | None = None
    """A running node's socket (``fedrlhf deploy client-host``): the dictation attacks then go to that process."""
    remote_node: Any = None
    """Any object with ``handle(bytes) -> bytes`` that reaches a real node (a Flower SuperNode through
    the Grid): the dictation attacks then go there; ``describe()`` names it ``remote``."""
    data_dir: Path | None = None
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def kind(self) -> str:
        return self.config.aggregation.kind

    def with_aggregation(self, **params: Any) -> RunConfig:
        """The user's config with ``aggregation`` keys replaced (``kind`` included)."""
        raw = self.config.to_mapping()
        agg = dict(raw["aggregation"]) if "kind" not in params or params["kind"] == raw["aggregation"]["kind"] else {}
        agg.update(params)
        agg.setdefault("kind", raw["aggregation"]["kind"])
        raw["aggregation"] = agg
        return build_config(raw, source="<redteam>")

    def protocol_config(self, **params: Any) -> RunConfig:
        """The config a protocol attack runs: the user's aggregation (plus ``params``), no DP (the
        attacks score what enters the aggregator against what the adversary recovers; DP noise
        would only add a known offset), and ``max_weight`` large enough for the synthetic weights."""
        raw = self.config.to_mapping()
        raw["aggregation"] = {**raw["aggregation"], **params}
        raw["privacy"] = {"mode": "none"}
        return build_config(raw, source="<redteam>")

    def aggregator(self, config: RunConfig, ids: Sequence[int]) -> RecordingAggregator:
        factory = self.aggregator_factory or (lambda c, i: build_aggregator(c, list(i)))
        return RecordingAggregator(factory(config, list(ids)))

    def task(self, n: int | None = None) -> SyntheticTask:
        return SyntheticTask(self.n if n is None else n, self.dim)

    def make_host(
        self, client_ids: Sequence[int], task: Task, workdir: Path, *, user_config: RunConfig | None = None, **kwargs: Any
    ) -> ParticipantHost:
        """A node of a user running ``user_config`` (default the target's; the protocol attacks pass the
        config the round actually runs, e.g. without DP, so the node's own policy matches it)."""
        factory = self.host_factory or honest_node
        return factory(user_config or self.config, client_ids, task, workdir, **kwargs)

    def _node_name(self) -> str | None:
        if self.node_socket is not None:
            return str(self.node_socket)
        return repr(self.remote_node) if self.remote_node is not None else None

    def describe(self) -> dict[str, Any]:
        return {
            "config": self.config.source,
            "task": self.config.task.kind,
            "aggregation": self.config.aggregation.to_mapping(),
            "privacy_mode": self.config.privacy.mode,
            "clients": self.n,
            "clients_source": self.n_source,
            "dim": self.dim,
            "node_socket": self._node_name(),
        }


def honest_node(user_config: RunConfig, client_ids: Sequence[int], task: Task, workdir: Path, **kwargs: Any) -> ParticipantHost:
    """A deployment node of a user who runs ``user_config``: the host the server sends frames to.

    This is the one place that says how a node is set up: its own policy, which the server cannot
    change, is the user's config (:meth:`~fedrlhf_secure.federation.policy.NodePolicy.from_config`,
    what an in-process participant uses; a deployment node reads the same from its policy file).
    """
    from fedrlhf_secure.federation.policy import NodePolicy

    state = workdir / "node-state"
    state.mkdir(parents=True, exist_ok=True)
    return ParticipantHost(list(client_ids), state_dir=state, task=task, policy=NodePolicy.from_config(user_config), **kwargs)


class SyntheticClient(TaskClient):
    """A client whose "local training" is a seeded Gaussian delta (scale 0.01, inside every clip range)."""

    def __init__(self, cid: int, dim: int) -> None:
        self.client_id, self.dim = cid, dim

    def num_examples(self) -> int:
        return 1 + self.client_id % 50

    def fit(self, shared: Mapping[str, np.ndarray], config: FitConfig) -> FitResult:
        rng = np.random.default_rng([config.seed, self.client_id, 0x5EC])
        delta = (rng.standard_normal(self.dim) * 0.01).astype(np.float32)
        return FitResult({"v": delta}, self.num_examples(), {}, {"loss": float(np.abs(delta).mean())})

    def evaluate(self, shared: Mapping[str, np.ndarray]) -> dict[str, float]:
        return {"norm": float(np.linalg.norm(shared["v"]))}


class SyntheticTask(Task):
    name = "redteam-synthetic"

    def __init__(self, n: int, dim: int) -> None:
        self.n, self.dim = n, dim

    def client_ids(self) -> list[int]:
        return list(range(self.n))

    def shared_spec(self) -> ParamSpec:
        return ParamSpec((ParamEntry("v", (self.dim,)),))

    def initial_shared(self) -> dict[str, np.ndarray]:
        return {"v": np.zeros(self.dim, np.float32)}

    def make_client(self, client_id: int) -> TaskClient:
        return SyntheticClient(client_id, self.dim)


class RecordingAggregator(Aggregator):
    """The configured aggregator, unchanged, noting what each client half was given: the victim's
    true update, against which the suite scores what the adversary recovered (never sent anywhere)."""

    def __init__(self, inner: Aggregator) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.capabilities = inner.capabilities
        self.inputs: dict[tuple[int, int], tuple[np.ndarray, float]] = {}

    def prepare(self, rounds: int) -> None:
        self.inner.prepare(rounds)

    def server(self, ctx: RoundContext) -> ServerHalf:
        return self.inner.server(ctx)

    def client(self, ctx: RoundContext, client_id: int, vector: np.ndarray, weight: float, *, integer_noise=None) -> ClientHalf:
        self.inputs[(ctx.round, client_id)] = (np.array(vector, dtype=np.float64), float(weight))
        return self.inner.client(ctx, client_id, vector, weight, integer_noise=integer_noise)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def release_halves(
    config: RunConfig, aggregator: Aggregator, ctx: RoundContext, clients: Iterable[int], task: Task
) -> dict[int, ClientHalf]:
    """Each client's half, made by the real participant pipeline (fit → privacy layer → aggregator)."""
    codec = UpdateCodec(task.shared_spec(), config.federation.sparse_rows)
    shared = task.initial_shared()
    fit = FitInstruction(ctx.round, 1, config.seed, shared)
    out = {}
    for c in clients:
        p = Participant(c, task.make_client(c), codec, NoClientPrivacy(), config.federation.weighting)
        out[c] = p.release(shared, fit, ctx, aggregator).half
    return out


def kind_of(data: bytes) -> str:
    """A frame's kind without parsing the rest (what a router looks at)."""
    if len(data) < 6 or data[:4] != wire.MAGIC:
        return "?"
    return data[6 : 6 + data[5]].decode("ascii", "replace")


def score(recovered: np.ndarray | None, truth: np.ndarray, step: float = 0.0) -> dict[str, Any]:
    """How close the adversary's reconstruction is to the victim's true update.

    ``recovered`` is True when every coordinate is within two quantisation steps ``step`` (what the
    protocol's own encoding loses: SecAgg rounds ``w·x`` to ``1/scale``) or within 1e-3 of the
    update's largest coordinate (CKKS, plain); a masked or encrypted vector misses by orders of
    magnitude more."""
    truth = np.asarray(truth, np.float64)
    if recovered is None:
        return {"recovered": False}
    recovered = np.asarray(recovered, np.float64)
    if recovered.shape != truth.shape or not np.all(np.isfinite(recovered)):
        return {"recovered": False, "note": f"reconstruction of shape {recovered.shape} is unusable"}
    peak = max(float(np.max(np.abs(truth))), 1e-30)
    err = float(np.max(np.abs(recovered - truth)))
    tol = max(2.0 * step, 1e-3 * peak)
    return {"recovered": err <= tol, "max_abs_error": err, "relative_error": err / peak, "tolerance": tol, "update_peak": peak}


# ---------------------------------------------------------------------------------------------
# SecAgg: one honest round up to the masked inputs, forkable
# ---------------------------------------------------------------------------------------------


@dataclass
class WorldLog:
    """What happened in one continuation of a round: every frame the clients sent, who refused what."""

    sent: list[tuple[int, bytes]] = field(default_factory=list)
    refusals: dict[int, str] = field(default_factory=dict)
    rejected_by_server: dict[int, str] = field(default_factory=dict)
    aborted: str | None = None
    result: Any = None


def _deliver(
    halves: Mapping[int, ClientHalf], pending: Sequence[tuple[int, bytes]], log: WorldLog, down: Tamper | None, up: Tamper | None
) -> list[tuple[int, bytes]]:
    replies = []
    for cid, data in pending:
        if cid not in halves or cid in log.refusals:
            continue
        if down is not None:
            data = down(cid, data)
            if data is None:
                continue
        try:
            out = halves[cid].receive(data)
        except ProtocolError as exc:
            log.refusals[cid] = str(exc)
            continue
        for r in out:
            if up is not None:
                r = up(cid, r)
                if r is None:
                    continue
            log.sent.append((cid, r))
            replies.append((cid, r))
    return replies


def _feed(server: ServerHalf, replies: Sequence[tuple[int, bytes]], log: WorldLog) -> list[tuple[int, bytes]]:
    nxt = []
    for cid, r in replies:
        try:
            nxt += server.receive(cid, r)
        except ProtocolError as exc:
            log.rejected_by_server[cid] = str(exc)
    return nxt


def drive_world(
    server: ServerHalf,
    halves: Mapping[int, ClientHalf],
    pending: Sequence[tuple[int, bytes]],
    *,
    down: Tamper | None = None,
    up: Tamper | None = None,
    max_stages: int = 32,
    log: WorldLog | None = None,
) -> WorldLog:
    """Run the protocol on from ``pending`` with only ``halves`` answering; stalls close the stage."""
    log = log or WorldLog()
    try:
        for _ in range(max_stages):
            if server.done:
                break
            replies = _deliver(halves, pending, log, down, up)
            pending = _feed(server, replies, log)
            if not pending and not server.done:
                pending = server.close_stage()
            if not pending and not server.done:
                break
        if pending and server.done:
            _deliver(halves, pending, log, down, up)  # the server's last messages (CKKS aggregate)
    except AggregationAborted as exc:
        log.aborted = str(exc)
    log.result = server.result() if server.done else None
    return log


class SecAggRun:
    """A real SecAgg round at the target's size, run honestly (or with ``down``/``up`` hooks) until
    every client has computed its masked input; the state is then kept for :meth:`fork`."""

    def __init__(
        self,
        target: Target,
        *,
        config: RunConfig | None = None,
        session: bytes | None = None,
        participants: Sequence[int] | None = None,
        round_index: int = 0,
        down: Tamper | None = None,
        up: Tamper | None = None,
    ) -> None:
        self.target = target
        self.config = config or target.protocol_config()
        ids = list(range(target.n))
        self.participants = tuple(sorted(participants if participants is not None else ids))
        self.task = target.task()
        self.aggregator = target.aggregator(self.config, ids)
        self.ctx = RoundContext(session or os.urandom(16), round_index, self.participants, target.dim)
        self.server = self.aggregator.server(self.ctx)
        self.clients = release_halves(self.config, self.aggregator, self.ctx, self.participants, self.task)
        self.inbox: dict[int, list[bytes]] = {c: [] for c in self.participants}
        self.outbox: dict[int, list[bytes]] = {c: [] for c in self.participants}
        self.log = WorldLog()
        self.masked: dict[int, bytes] = {}
        self.other_replies: list[tuple[int, bytes]] = []
        pending = self.server.start()
        for _ in range(16):
            replies = []
            for cid, data in pending:
                if down is not None:
                    data = down(cid, data)
                    if data is None:
                        continue
                self.inbox.setdefault(cid, []).append(data)
                if cid in self.log.refusals:
                    continue
                try:
                    out = self.clients[cid].receive(data)
                except ProtocolError as exc:
                    self.log.refusals[cid] = str(exc)
                    continue
                for r in out:
                    if up is not None:
                        r = up(cid, r)
                        if r is None:
                            continue
                    self.outbox.setdefault(cid, []).append(r)
                    replies.append((cid, r))
            if any(kind_of(r) == "secagg/masked-input" for _, r in replies):
                self.masked = {cid: r for cid, r in replies if kind_of(r) == "secagg/masked-input"}
                self.other_replies = [(cid, r) for cid, r in replies if kind_of(r) != "secagg/masked-input"]
                break
            try:
                pending = _feed(self.server, replies, self.log)
                if not pending and not self.server.done:
                    pending = self.server.close_stage()
            except AggregationAborted as exc:
                self.log.aborted = str(exc)
                break
            if not pending:
                break

    @property
    def threshold(self) -> int:
        return int(self.aggregator.threshold(self.ctx))

    @property
    def degree(self) -> int:
        return int(self.aggregator.degree(self.ctx))

    def neighbours(self, cid: int) -> frozenset[int]:
        from aggregation.secagg.graph import neighbours_of

        return neighbours_of(self.ctx.session_id, self.ctx.round, self.ctx.participants, self.degree, cid)

    def truth(self, cid: int) -> np.ndarray:
        """The victim's update as it entered its aggregator half (weight divided out again)."""
        vector, _ = self.aggregator.inputs[(self.ctx.round, cid)]
        clip = float(getattr(self.aggregator.inner.config, "clip_range", math.inf))
        return np.clip(vector, -clip, clip)

    def fork(self) -> tuple[ServerHalf, dict[int, ClientHalf]]:
        """A fresh copy of the server half (before it saw any masked input) and of every client half."""
        return copy.deepcopy(self.server), copy.deepcopy(self.clients)

    def feed_masked(self, server: ServerHalf, senders: Iterable[int], log: WorldLog) -> list[tuple[int, bytes]]:
        """Hand the server the masked inputs of ``senders`` (and any other stage replies); its next messages."""
        chosen = set(senders)
        pending = _feed(server, [(c, r) for c, r in self.other_replies if c in chosen], log)
        pending += _feed(server, [(c, r) for c, r in self.masked.items() if c in chosen], log)
        if not pending and not server.done:
            try:
                pending = server.close_stage()
            except AggregationAborted as exc:
                log.aborted = str(exc)
        return pending

    # ------------------------------------------------------------- what the server holds about a client
    def frame(self, box: Mapping[int, list[bytes]], cid: int, kind: str) -> bytes | None:
        return next((f for f in box.get(cid, []) if kind_of(f) == kind), None)

    def advertised(self, cid: int):
        from aggregation.secagg.messages import Keys

        data = self.frame(self.outbox, cid, "secagg/keys")
        return None if data is None else Keys.decode(data, self.ctx, cid)


# ---------------------------------------------------------------------------------------------
# From shares to an individual update
# ---------------------------------------------------------------------------------------------


def shares_of(frames: Iterable[tuple[int, bytes]], ctx: RoundContext, owner: int) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """The ``owner``'s self-mask-seed shares and mask-key shares found in unmask answers, by holder."""
    from aggregation.secagg.messages import Unmask

    seeds, keys = {}, {}
    for sender, data in frames:
        if kind_of(data) != "secagg/unmask":
            continue
        try:
            msg = Unmask.decode(data, ctx, sender)
        except ProtocolError:
            continue
        for ids, shares, into in ((msg.seed_ids, msg.seed_shares, seeds), (msg.key_ids, msg.key_shares, keys)):
            hits = np.flatnonzero(np.asarray(ids) == owner)
            if hits.size:
                into[sender] = np.asarray(shares[hits[0]], dtype=np.uint64)
    return seeds, keys


def reconstruct_secret(shares: Mapping[int, np.ndarray], threshold: int, length: int) -> bytes | None:
    """Lagrange interpolation at 0 from the first ``threshold`` shares (share point = holder id + 1)."""
    from aggregation.secagg import shamir
    from aggregation.secagg.client import share_point

    if len(shares) < threshold:
        return None
    holders = sorted(shares)[:threshold]
    xs = np.array([[share_point(h) for h in holders]], dtype=np.uint64)
    ys = np.array([[shares[h] for h in holders]], dtype=np.uint64)
    try:
        return shamir.elements_to_bytes(shamir.reconstruct(xs, ys)[0], length)
    except ValueError:
        return None


def unmask_individual(run: SecAggRun, victim: int, seed: bytes, s_sk_raw: bytes) -> np.ndarray | None:
    """The victim's update from its masked input, its self-mask seed and its mask key:
    ``y − PRG(b) − Σ_j ±PRG(s_vj)`` over the neighbours it masked with, then ÷ its weight."""
    from aggregation.secagg import crypto, prg
    from aggregation.secagg.client import pair_mask_seed
    from aggregation.secagg.messages import MaskedInput, ShareBundle

    q = run.aggregator.quantizer
    masked = run.masked.get(victim)
    bundle = run.frame(run.inbox, victim, "secagg/share-bundle")
    if masked is None or bundle is None:
        return None
    y = MaskedInput.decode(masked, run.ctx, victim, q.dtype).vector.copy()
    prg.add_mask(y, seed, -1)
    try:
        s_sk = crypto.x25519_from_private(s_sk_raw)
    except ValueError:
        return None
    advertised = run.advertised(victim)
    if advertised is None or crypto.public_bytes(s_sk) != advertised.s_pk:
        return None  # not the victim's key: the shares did not reconstruct it
    for peer in (int(p) for p in ShareBundle.decode(bundle, run.ctx, victim).ids):
        keys = run.advertised(peer)
        secret = crypto.agree(s_sk, keys.s_pk, peer=peer)
        prg.add_mask(y, pair_mask_seed(secret, run.ctx, victim, peer), -1 if peer > victim else +1)
    weighted, weight = q.decode(y)
    if weight <= 0:
        return None
    return np.asarray(weighted, np.float64) / weight


def recover_from_shares(run: SecAggRun, victim: int, seeds: Mapping[int, np.ndarray], keys: Mapping[int, np.ndarray]) -> dict[str, Any]:
    """Try to rebuild the victim's update from the shares the adversary collected; the evidence."""
    from aggregation.secagg import crypto, prg

    t = run.threshold
    seed = reconstruct_secret(seeds, t, prg.SEED_BYTES)
    s_sk = reconstruct_secret(keys, t, crypto.KEY_BYTES)
    out: dict[str, Any] = {"threshold": t, "seed_shares": len(seeds), "key_shares": len(keys)}
    if seed is None or s_sk is None:
        out["recovered"] = False
        return out
    x = unmask_individual(run, victim, seed, s_sk)
    if x is None:
        out["recovered"] = False
        out["note"] = "the reconstructed secrets do not unmask the victim's input"
        return out
    _, weight = run.aggregator.inputs[(run.ctx.round, victim)]
    step = 1.0 / (float(run.aggregator.quantizer.scale) * max(weight, 1e-12))
    out.update(score(x, run.truth(victim), step))
    out["quantisation_step"] = step
    return out
