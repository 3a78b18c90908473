"""The CKKS aggregation round: masked plaintexts, encrypted sum, checked and flooded decryption.

Messages (all :class:`aggregation.wire.Frame` s, bound to the run's session id, the round and the
key epoch's ``key_id``)::

    server <-> client  ckks/mask       {round, session, key_id} + one SecAgg+ frame ("inner")
    client -> server   ckks/update     {round, session, key_id} + ciphertexts of the masked
                                         [w_k x_k, w_k, checks] + the SecAgg masked input of r_k
    server -> client   ckks/aggregate  {round, session, key_id, contributors} + ciphertexts of
                                         the sum over S + R = sum_S r_k mod 2^(b+f) ("unmask")

The round is a SecAgg+ round (:mod:`aggregation.secagg`, reused through its public aggregator) over
each client's one-time mask ``r_k`` (:mod:`.masking`), whose masked-input stage also carries the
client's CKKS ciphertext of ``plaintext_k + r_k``: the server accepts both or neither, so the
ciphertexts it adds are exactly those of SecAgg's survivor set ``S``, and after SecAgg's unmask stage
it knows ``R = sum_S r_k`` and nothing else. Clients then get the ciphertext sum and ``R``; before
decrypting they check the contributor list (distinct participants, themselves included, at least
the minimum), after decrypting they remove ``R`` modulo ``2^b``, verify the secret check slots,
and add flooding noise. Anything but the sum over the claimed set is refused or decrypts to noise.

Weights: each client multiplies its own vector by its own weight *before* encrypting (FedAvg's
``w_k x_k``) and sends ``w_k`` in one more slot; the server only adds ciphertexts (no rescale, a
one-prime ciphertext modulus, :mod:`.params`) and never learns any ``w_k``.

The server holds a context with no key at all (:meth:`PublicContext.load` refuses a private one),
so :meth:`CKKSServer.result` is ``None``: it sees neither an update nor the aggregate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .. import wire
from ..base import (
    AggregateResult,
    AggregationAborted,
    Aggregator,
    Capabilities,
    ClientHalf,
    ProtocolError,
    RoundContext,
    ServerHalf,
    refuse_integer_noise,
    spec_for,
)
from ..errors import AggregationConfigError
from ..secagg import SecAggAggregator
from ..secagg.config import SecAggConfig
from ..secagg.messages import MaskedInput
from . import codec, masking
from .keys import ClientKey, ClientKeyPair, DealerKey, PublicContext, deal, open_package
from .params import CKKSConfig

MASK = "ckks/mask"
UPDATE = "ckks/update"
AGGREGATE = "ckks/aggregate"
_INNER_SLACK = 64 * 1024
_INNER_PER_PEER = 512
"""Upper bound on one peer's entry in a SecAgg key directory or share bundle, in bytes."""


@dataclass(frozen=True)
class Layout:
    """Where things sit in the encrypted vector of one round: ``payload`` = ``[w x, w]`` (``dim + 1``
    values) in the non-check slots, the secret check values at ``positions`` (:mod:`.masking`)."""

    payload: int
    checks: int
    positions: np.ndarray | None = None

    @property
    def length(self) -> int:
        return self.payload + self.checks

    def data_slots(self) -> np.ndarray:
        keep = np.ones(self.length, dtype=bool)
        keep[self.positions] = False
        return keep


def _inner_limit(ctx: RoundContext, length: int) -> int:
    return 8 * (length + 1) + _INNER_PER_PEER * len(ctx.participants) + _INNER_SLACK


def _max_frame_bytes(config: CKKSConfig, ctx: RoundContext, length: int) -> int:
    per = config.raw_ciphertext_bytes() + codec.CIPHERTEXT_METADATA_BYTES + codec.SEAL_HEADER_BYTES + 128
    chunks = len(codec.chunk_lengths(config, length))
    return chunks * (per + 16) + 8 * length + _inner_limit(ctx, length) + 64 * 1024


def _frame(kind: str, ctx: RoundContext, key_id: bytes, blobs: list[bytes] | None = None, tensors=None, **extra) -> bytes:
    header = {"round": ctx.round, "session": ctx.session_id.hex(), "key_id": key_id.hex(), **extra}
    out = dict(tensors or {})
    if blobs is not None:
        data, lengths = codec.join(blobs)
        out.update({"ciphertexts": data, "lengths": lengths})
    return wire.encode(wire.Frame(kind, header, out))


def _check_binding(frame: wire.Frame, ctx: RoundContext, key_id: bytes) -> None:
    if frame.field("round", int) != ctx.round:
        raise ProtocolError(f"{frame.kind} is for round {frame.header['round']}, not {ctx.round}")
    if frame.field("session", str) != ctx.session_id.hex():
        raise ProtocolError(f"{frame.kind} belongs to another session")
    if frame.field("key_id", str) != key_id.hex():
        raise ProtocolError(f"{frame.kind} is under another CKKS key (key_id {frame.header['key_id']!r})")


def _blobs(frame: wire.Frame, config: CKKSConfig, length: int) -> list[bytes]:
    data = frame.tensor("ciphertexts", np.uint8, (None,))
    lengths = frame.tensor("lengths", np.int64, (None,))
    return codec.split(data, lengths, config, length)


def _layout(plan: masking.MaskPlan, ctx: RoundContext) -> Layout:
    payload = ctx.dim + 1
    return Layout(payload, plan.checks(payload))


def _inner_ctx(ctx: RoundContext, layout: Layout) -> RoundContext:
    return RoundContext(ctx.session_id, ctx.round, ctx.participants, layout.length)


class CKKSServer(ServerHalf):
    """Runs the mask SecAgg+ server and adds the clients' ciphertexts under a key-less context."""

    def __init__(
        self, ctx: RoundContext, config: CKKSConfig, public: PublicContext, plan: masking.MaskPlan, masks: SecAggAggregator
    ) -> None:
        self.ctx = ctx
        self.config = config
        self.plan = plan
        self.key_id = public.key_id
        self._context = public.load(config)
        if self._context.is_private() or self._context.has_secret_key():
            raise AssertionError("the server's CKKS context must not hold a secret key")
        self.layout = _layout(plan, ctx)
        self.length = self.layout.length
        self._inner = masks.server(_inner_ctx(ctx, self.layout))
        self._max_bytes = _max_frame_bytes(config, ctx, self.length)
        self._inner_max = _inner_limit(ctx, self.length)
        self._sum: list | None = None
        self._got: list[int] = []
        self._closed = False

    def _wrap(self, out: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        return [(cid, _frame(MASK, self.ctx, self.key_id, tensors={"inner": wire.as_blob(m)})) for cid, m in out]

    def start(self) -> list[tuple[int, bytes]]:
        return self._wrap(self._inner.start())

    def receive(self, sender: int, data: bytes) -> list[tuple[int, bytes]]:
        if self._closed:
            raise ProtocolError(f"round {self.ctx.round} is closed; message from client {sender} rejected")
        if sender not in self.ctx.participants:
            raise ProtocolError(f"client {sender} is not a participant of round {self.ctx.round}")
        try:
            frame = wire.decode(data, expect=(MASK, UPDATE), max_bytes=self._max_bytes)
            _check_binding(frame, self.ctx, self.key_id)
            inner = frame.blob("inner", max_bytes=self._inner_max)
            chunks = None
            if frame.kind == UPDATE:
                if sender in self._got:
                    raise ProtocolError(f"client {sender} already sent its update (replay?)")
                wire.decode(inner, expect=MaskedInput.KIND, max_bytes=self._inner_max)
                chunks = codec.load_chunks(_blobs(frame, self.config, self.length), self._context, self.config, self.length)
        except (wire.WireError, ValueError) as exc:
            if isinstance(exc, ProtocolError):
                raise
            raise ProtocolError(f"message from client {sender} rejected: {exc}") from exc
        out = self._inner.receive(sender, inner)  # refuses (ProtocolError) before any state changes
        if chunks is not None:
            if self._sum is None:
                self._sum = chunks
            else:
                for acc, c in zip(self._sum, chunks, strict=True):
                    acc.add_(c)
            self._got.append(sender)
        return self._after(out)

    def _after(self, out: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        wrapped = self._wrap(out)
        if self._inner.done and not self._closed:
            wrapped += self._finish()
        return wrapped

    def _finish(self) -> list[tuple[int, bytes]]:
        self._closed = True
        res = self._inner.result()
        if res is None or self._sum is None:
            raise AggregationAborted(f"round {self.ctx.round}: the mask aggregation produced no sum")
        contributors = sorted(res.contributors)
        if contributors != sorted(self._got) or round(res.total_weight) != len(contributors):
            raise AggregationAborted(
                f"round {self.ctx.round}: the mask sum covers {len(contributors)} clients, the ciphertext sum {len(self._got)}"
            )
        unmask = np.mod(np.rint(res.weighted_sum).astype(np.int64), self.plan.modulus).astype(np.uint64)
        blobs = [c.serialize() for c in self._sum]
        msg = _frame(AGGREGATE, self.ctx, self.key_id, blobs, tensors={"unmask": unmask}, contributors=contributors)
        self._sum = None
        return [(cid, msg) for cid in contributors]

    def close_stage(self) -> list[tuple[int, bytes]]:
        if self._closed:
            return []
        return self._after(self._inner.close_stage())

    @property
    def done(self) -> bool:
        return self._closed

    def result(self) -> AggregateResult | None:
        return None  # by design: the server holds no key


class CKKSClient(ClientHalf):
    """Masks and encrypts ``[w x, w]``; decrypts, unmasks, checks and floods the returned aggregate.

    The three defences are the methods :meth:`_masked`, :meth:`_verify` and :meth:`_flood`; the tests
    that show each is load-bearing override them in a deliberately weakened subclass of their own
    (``tests/ckks_rounds.py``): nothing in the package can turn one off.
    """

    def __init__(
        self,
        ctx: RoundContext,
        config: CKKSConfig,
        key: ClientKey,
        client_id: int,
        vector: np.ndarray,
        weight: float,
        plan: masking.MaskPlan,
        masks: SecAggAggregator,
    ) -> None:
        vec = np.asarray(vector, dtype=np.float64)
        if vec.shape != (ctx.dim,):
            raise ValueError(f"client {client_id}: vector has shape {vec.shape}, the round expects ({ctx.dim},)")
        weight = float(weight)
        if not np.isfinite(weight) or weight < 0 or not np.all(np.isfinite(vec)):
            raise ValueError(f"client {client_id}: the update or its weight is non-finite or negative")
        if client_id not in ctx.participants:
            raise ValueError(f"client {client_id} is not a participant of round {ctx.round}")
        if len(ctx.participants) > plan.max_clients:
            raise ValueError(f"round {ctx.round} has {len(ctx.participants)} participants; the masks were planned for {plan.max_clients}")
        payload = np.append(weight * vec, weight)
        peak = float(np.max(np.abs(payload)))
        if peak > plan.bound:
            raise ValueError(
                f"client {client_id}: |w x| or w reaches {peak:.4g}, above aggregation.max_abs = {plan.bound:g} "
                "(the masked sum is exact only within that bound; raise aggregation.max_abs)"
            )
        self.ctx, self.config, self.key, self.client_id, self.plan = ctx, config, key, client_id, plan
        layout = _layout(plan, ctx)
        positions = masking.check_positions(key.check_key, ctx.session_id, ctx.round, layout.length, layout.checks)
        self.layout = Layout(layout.payload, layout.checks, positions)
        self.sigma = plan.flood_sigma(len(ctx.participants), layout.payload)
        if plan.grid > self.sigma / 4:
            raise ValueError(f"the mask grid 2^-{plan.f} is coarser than a quarter of the flooding sigma {self.sigma:.3g}")
        ictx = _inner_ctx(ctx, self.layout)
        mask = masking.sample_mask(self.layout.length, plan.total_bits)
        self.threshold = masks.threshold(ictx)
        zeros = np.broadcast_to(np.float32(0), (self.layout.length,))  # the mask rides as integer noise; no memory
        self._inner = masks.client(ictx, client_id, zeros, 1.0, integer_noise=mask)
        tau = masking.check_values(key.check_key, ctx.session_id, ctx.round, client_id, layout.checks, plan.total_bits)
        plain = np.empty(self.layout.length, dtype=np.float64)
        keep = self.layout.data_slots()
        plain[keep] = self._masked(payload, mask[keep].astype(np.float64) * plan.grid)
        at = positions
        plain[at] = ((tau + mask[at].astype(np.uint64)) & np.uint64(plan.modulus - 1)).astype(np.float64) * plan.grid
        self._plain: np.ndarray | None = plain
        self._max_bytes = _max_frame_bytes(config, ctx, self.layout.length)
        self._inner_max = _inner_limit(ctx, self.layout.length)
        self._sent = False
        self._result: AggregateResult | None = None

    def receive(self, data: bytes) -> list[bytes]:
        try:
            frame = wire.decode(data, expect=(MASK, AGGREGATE), max_bytes=self._max_bytes)
            _check_binding(frame, self.ctx, self.key.key_id)
            if frame.kind == MASK:
                inner = frame.blob("inner", max_bytes=self._inner_max)
            else:
                contributors = self._check_claim(frame)
                unmask = frame.tensor("unmask", np.uint64, (self.layout.length,))
                if np.any(unmask >= np.uint64(self.plan.modulus)):
                    raise ProtocolError(f"client {self.client_id}: the aggregate's unmask vector is outside [0, 2^{self.plan.total_bits})")
                length = self.layout.length
                chunks = codec.load_chunks(_blobs(frame, self.config, length), self.key.context, self.config, length)
        except (wire.WireError, ValueError) as exc:
            if isinstance(exc, ProtocolError):
                raise
            raise ProtocolError(f"client {self.client_id}: {exc}") from exc
        if frame.kind == MASK:
            return self._relay(inner)
        self._decrypt(data, contributors, unmask, chunks)
        return []

    def _relay(self, inner: bytes) -> list[bytes]:
        if self._result is not None:
            raise ProtocolError(f"client {self.client_id}: round {self.ctx.round} is over")
        out = []
        for reply in self._inner.receive(inner):
            if wire.decode(reply).kind == MaskedInput.KIND:
                assert self._plain is not None
                blobs = codec.encrypt(self._plain, self.key.context, self.config)
                self._plain = None
                self._sent = True
                out.append(_frame(UPDATE, self.ctx, self.key.key_id, blobs, tensors={"inner": wire.as_blob(reply)}))
            else:
                out.append(_frame(MASK, self.ctx, self.key.key_id, tensors={"inner": wire.as_blob(reply)}))
        return out

    def _check_claim(self, frame: wire.Frame) -> list[int]:
        """The contributor list, checked before anything is decrypted."""
        if not self._sent or self._result is not None:
            raise ProtocolError(f"client {self.client_id}: unexpected aggregate in round {self.ctx.round}")
        contributors = frame.field("contributors", list)
        if (
            not contributors
            or any(not isinstance(c, int) or isinstance(c, bool) for c in contributors)
            or len(set(contributors)) != len(contributors)
            or not set(contributors) <= set(self.ctx.participants)
            or self.client_id not in contributors
        ):
            raise ProtocolError(f"client {self.client_id}: aggregate has an invalid contributor list")
        need = self.plan.minimum(len(self.ctx.participants), self.threshold)
        if len(contributors) < need:
            raise ProtocolError(
                f"client {self.client_id}: the aggregate claims {len(contributors)} contributors, "
                f"the policy requires at least {need} (aggregation.min_contributors); not decrypted"
            )
        return sorted(contributors)

    def _masked(self, payload: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The plaintext of the data slots: the update plus its one-time mask."""
        return payload + mask

    def _decrypt(self, data: bytes, contributors: list[int], unmask: np.ndarray, chunks: list) -> None:
        plan, layout = self.plan, self.layout
        values = masking.centred(codec.decrypt(chunks) - unmask.astype(np.float64) * plan.grid, float(2**plan.b))
        self._verify(values, contributors)
        payload = self._flood(values[layout.data_slots()], data)
        self._result = AggregateResult(payload[: self.ctx.dim], float(payload[self.ctx.dim]), tuple(contributors))

    def _verify(self, values: np.ndarray, contributors: list[int]) -> None:
        """Refuse unless the check slots hold the claimed contributors' secret check values."""
        plan, layout, ctx = self.plan, self.layout, self.ctx
        expected = masking.expected_checks(self.key.check_key, ctx.session_id, ctx.round, contributors, layout.checks, plan.total_bits)
        deviation = masking.centred(values[layout.positions] - expected.astype(np.float64) * plan.grid, float(2**plan.b))
        tol = plan.tolerance(len(contributors))
        worst = float(np.max(np.abs(deviation)))
        if not worst <= tol:
            raise ProtocolError(
                f"client {self.client_id}: the aggregate is not the sum of its {len(contributors)} claimed contributors' "
                f"updates (check slots off by up to {worst:.3g}, tolerance {tol:.3g}); refused"
            )

    def _flood(self, payload: np.ndarray, data: bytes) -> np.ndarray:
        """Add the flooding noise, a PRF of the aggregate's bytes (:func:`.masking.flooding`)."""
        return payload + masking.flooding(self.key.check_key, data, payload.size, self.sigma)

    @property
    def done(self) -> bool:
        return self._result is not None

    @property
    def masks(self):
        """The SecAgg+ client of this round's mask (what a test or the red team inspects)."""
        return self._inner

    def result(self) -> AggregateResult | None:
        return self._result


class KeySource(Protocol):
    """Where the halves get their keys: the server only ever sees :meth:`public`."""

    def public(self, epoch: int) -> PublicContext: ...

    def client_key(self, client_id: int, epoch: int) -> ClientKey: ...


@dataclass
class SimulatedDealer:
    """In-process key setup: each client makes its X25519 key pair, a dealer (not the server) deals.

    This is the same code path as ``fedrlhf keys`` with the files kept in memory: the server half
    receives the signed public context, each client half opens its own sealed package with its own
    private key, authenticated against the pinned dealer key.
    """

    config: CKKSConfig
    client_ids: Sequence[int]
    _identities: dict[int, ClientKeyPair] = field(default_factory=dict, init=False)
    _dealer: DealerKey = field(default_factory=DealerKey.generate, init=False)
    _deals: dict[int, object] = field(default_factory=dict, init=False)
    _ahead: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self._identities = {cid: ClientKeyPair.generate(cid) for cid in self.client_ids}

    @property
    def dealer_verify_key(self) -> bytes:
        return self._dealer.verify_bytes

    def deal_ahead(self, epochs: Sequence[int]) -> None:
        """Deal these epochs now and keep them all (the embedded run forks its workers after this, so
        every process holds the same keys; a lazily dealt epoch would differ per process)."""
        recipients = {cid: kp.public_bytes for cid, kp in self._identities.items()}
        for epoch in epochs:
            if epoch not in self._deals:
                self._deals[epoch] = deal(self.config, recipients, self._dealer, epoch)
        self._ahead = True

    def _deal(self, epoch: int):
        if epoch not in self._deals:
            if not self._ahead:
                self._deals.clear()  # an old epoch's packages are never needed again
            recipients = {cid: kp.public_bytes for cid, kp in self._identities.items()}
            self._deals[epoch] = deal(self.config, recipients, self._dealer, epoch)
        return self._deals[epoch]

    def public(self, epoch: int) -> PublicContext:
        d = self._deal(epoch)
        return PublicContext.decode(d.public.encode(self.config), self.config, self.dealer_verify_key)

    def client_key(self, client_id: int, epoch: int) -> ClientKey:
        if client_id not in self._identities:
            raise ValueError(f"client {client_id} has no CKKS identity in this run")
        package = self._deal(epoch).packages[client_id]
        return open_package(package, self._identities[client_id], self.dealer_verify_key, self.config, epoch=epoch)


class CKKSAggregator(Aggregator):
    """CKKS-encrypted FedAvg with masked plaintexts: the server adds ciphertexts it cannot decrypt and
    learns one mask sum; clients decrypt only a checked aggregate of enough contributors."""

    kind = "ckks"
    capabilities = Capabilities(server_reads_result=False)

    def __init__(self, config: CKKSConfig, keys: KeySource, client_ids: Sequence[int], masks: SecAggAggregator | None = None) -> None:
        self.config = config
        self.keys = keys
        self.plan = masking.plan(config, len(client_ids))
        self.masks = masks if masks is not None else spec_for("secagg").factory(masking_config(config, self.plan), list(client_ids), 0)

    def epoch(self, round: int) -> int:
        return 0 if self.config.rotate_keys == "run" else round

    def prepare(self, rounds: int) -> None:
        per_key = rounds if self.config.rotate_keys == "run" else 1
        if per_key > self.config.flood_queries:
            raise AggregationConfigError(
                f"aggregation.flood_queries = {self.config.flood_queries} but {per_key} rounds decrypt under one key; "
                "raise aggregation.flood_queries (more flooding noise) or set aggregation.rotate_keys: round"
            )
        deal_ahead = getattr(self.keys, "deal_ahead", None)  # key files need no dealing
        if deal_ahead is not None:
            deal_ahead(sorted({self.epoch(r) for r in range(rounds)}))

    def server(self, ctx: RoundContext) -> ServerHalf:
        return CKKSServer(ctx, self.config, self.keys.public(self.epoch(ctx.round)), self.plan, self.masks)

    def client(self, ctx: RoundContext, client_id: int, vector: np.ndarray, weight: float, *, integer_noise=None) -> ClientHalf:
        refuse_integer_noise(self, integer_noise)
        if client_id not in ctx.participants:
            raise ValueError(f"client {client_id} is not a participant of round {ctx.round}")
        key = self.keys.client_key(client_id, self.epoch(ctx.round))
        return CKKSClient(ctx, self.config, key, client_id, vector, weight, self.plan, self.masks)


def masking_config(config: CKKSConfig, plan: masking.MaskPlan) -> SecAggConfig:
    """The SecAgg+ parameters of the mask round: the user's ``aggregation.masking`` plus a fixed-point
    encoding that carries the integer masks exactly (one level, weight 1, the mask as integer noise
    of at most ``2^(b+f) - 1``; ``max_clients * 2^(b+f) <= 2^52``, so no wrap and exact decoding)."""
    return SecAggConfig(
        **config.masking, clip_range=1.0, bits=64, levels=1, max_weight=1.0, weight_resolution=1.0, noise_bound=plan.modulus - 1
    )


def factory(config: CKKSConfig, client_ids: Sequence[int], seed: int) -> CKKSAggregator:
    """``aggregation: {kind: ckks}``: fresh keys for every run (``seed`` is deliberately unused: keys come from the OS)."""
    return CKKSAggregator(config, SimulatedDealer(config, list(client_ids)), list(client_ids))
