"""The CKKS aggregation round: clients encrypt, the server adds ciphertexts, clients decrypt.

Messages (all :class:`aggregation.wire.Frame` s, bound to the run's session id, the round and
the key epoch's ``key_id``)::

    server -> client  ckks/request    {round, session, key_id}
    client -> server  ckks/update     {round, session, key_id} + ciphertexts of [w_k x_k, w_k]
    server -> client  ckks/aggregate  {round, session, key_id, contributors} + ciphertexts of [S, W]

Weights: each client multiplies its own vector by its own weight *before* encrypting (FedAvg's
``w_k x_k``), and sends ``w_k`` in one more encrypted slot. The server then only adds ciphertexts
— no plaintext multiplication, so no rescale and a one-prime ciphertext modulus (see
:mod:`.params`) — and never learns any ``w_k``; clients read ``W = sum_k w_k`` by decryption.

The server holds a context with no key at all (:meth:`PublicContext.load` refuses a private one),
so :meth:`CKKSServer.result` is ``None``: it sees neither an update nor the aggregate. A client
that drops before sending contributes nothing; at the deadline the driver calls
:meth:`CKKSServer.close_stage` and the server returns the sum of what it got to those senders.
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
    check_single_upload,
    refuse_integer_noise,
)
from . import codec
from .keys import ClientKey, ClientKeyPair, DealerKey, PublicContext, deal, open_package
from .params import CKKSConfig, headroom

REQUEST = "ckks/request"
UPDATE = "ckks/update"
AGGREGATE = "ckks/aggregate"


def _max_frame_bytes(config: CKKSConfig, length: int) -> int:
    per = config.raw_ciphertext_bytes() + codec.CIPHERTEXT_METADATA_BYTES + codec.SEAL_HEADER_BYTES + 128
    chunks = len(codec.chunk_lengths(config, length))
    return chunks * (per + 16) + 64 * 1024


def _frame(kind: str, ctx: RoundContext, key_id: bytes, blobs: list[bytes] | None = None, **extra) -> bytes:
    header = {"round": ctx.round, "session": ctx.session_id.hex(), "key_id": key_id.hex(), **extra}
    tensors = {}
    if blobs is not None:
        data, lengths = codec.join(blobs)
        tensors = {"ciphertexts": data, "lengths": lengths}
    return wire.encode(wire.Frame(kind, header, tensors))


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


class CKKSServer(ServerHalf):
    """Adds the clients' ciphertexts under a key-less context; cannot read anything it handles."""

    def __init__(self, ctx: RoundContext, config: CKKSConfig, public: PublicContext) -> None:
        self.ctx = ctx
        self.config = config
        self.key_id = public.key_id
        self._context = public.load(config)
        if self._context.is_private() or self._context.has_secret_key():
            raise AssertionError("the server's CKKS context must not hold a secret key")
        self.length = ctx.dim + 1
        self._max_bytes = _max_frame_bytes(config, self.length)
        self._sum: list | None = None
        self._got: list[int] = []
        self._closed = False

    def start(self) -> list[tuple[int, bytes]]:
        msg = _frame(REQUEST, self.ctx, self.key_id)
        return [(cid, msg) for cid in self.ctx.participants]

    def receive(self, sender: int, data: bytes) -> list[tuple[int, bytes]]:
        check_single_upload(self.ctx, self._got, self._closed, sender)
        try:
            frame = wire.decode(data, expect=UPDATE, max_bytes=self._max_bytes)
            _check_binding(frame, self.ctx, self.key_id)
            chunks = codec.load_chunks(_blobs(frame, self.config, self.length), self._context, self.config, self.length)
        except (wire.WireError, ValueError) as exc:
            raise ProtocolError(f"update from client {sender} rejected: {exc}") from exc
        if self._sum is None:
            self._sum = chunks
        else:
            for acc, c in zip(self._sum, chunks, strict=False):
                acc.add_(c)
        self._got.append(sender)
        if len(self._got) == len(self.ctx.participants):
            return self._finish()
        return []

    def _finish(self) -> list[tuple[int, bytes]]:
        self._closed = True
        if self._sum is None:
            raise AggregationAborted(f"round {self.ctx.round}: no client sent an encrypted update")
        contributors = sorted(self._got)
        msg = _frame(AGGREGATE, self.ctx, self.key_id, [c.serialize() for c in self._sum], contributors=contributors)
        self._sum = None
        return [(cid, msg) for cid in contributors]

    def close_stage(self) -> list[tuple[int, bytes]]:
        if self._closed:
            return []
        return self._finish()

    @property
    def done(self) -> bool:
        return self._closed

    def result(self) -> AggregateResult | None:
        return None  # by design: the server holds no key


class CKKSClient(ClientHalf):
    """Encrypts ``[w x, w]`` under the epoch's secret key; decrypts the returned aggregate."""

    def __init__(self, ctx: RoundContext, config: CKKSConfig, key: ClientKey, client_id: int, vector: np.ndarray, weight: float) -> None:
        vec = np.asarray(vector, dtype=np.float64)
        if vec.shape != (ctx.dim,):
            raise ValueError(f"client {client_id}: vector has shape {vec.shape}, the round expects ({ctx.dim},)")
        weight = float(weight)
        if not np.isfinite(weight) or weight < 0 or not np.all(np.isfinite(vec)):
            raise ValueError(f"client {client_id}: the update or its weight is non-finite or negative")
        self.ctx, self.config, self.key, self.client_id = ctx, config, key, client_id
        self._payload = np.append(weight * vec, weight)
        peak = float(np.max(np.abs(self._payload))) * len(ctx.participants)
        if peak >= headroom(config):
            raise ValueError(
                f"client {client_id}: |w x| up to {peak / len(ctx.participants):.4g} times {len(ctx.participants)} clients "
                f"could exceed the {headroom(config):.4g} the CKKS parameters can decrypt "
                f"(2^(data bits {config.data_bits} - scale_bits {config.scale_bits} - 1)); "
                "raise aggregation.coeff_mod_bit_sizes[0] or lower aggregation.scale_bits"
            )
        self._sent = False
        self._result: AggregateResult | None = None

    def receive(self, data: bytes) -> list[bytes]:
        try:
            frame = wire.decode(data, expect=(REQUEST, AGGREGATE), max_bytes=_max_frame_bytes(self.config, self.ctx.dim + 1))
            _check_binding(frame, self.ctx, self.key.key_id)
            if frame.kind == REQUEST:
                if self._sent:
                    raise ProtocolError(f"client {self.client_id}: second request in round {self.ctx.round}")
                self._sent = True
                blobs = codec.encrypt(self._payload, self.key.context, self.config)
                self._payload = None
                return [_frame(UPDATE, self.ctx, self.key.key_id, blobs)]
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
            length = self.ctx.dim + 1
            chunks = codec.load_chunks(_blobs(frame, self.config, length), self.key.context, self.config, length)
        except (wire.WireError, ValueError) as exc:
            if isinstance(exc, ProtocolError):
                raise
            raise ProtocolError(f"client {self.client_id}: {exc}") from exc
        values = codec.decrypt(chunks)
        self._result = AggregateResult(values[: self.ctx.dim], float(values[self.ctx.dim]), tuple(sorted(contributors)))
        return []

    @property
    def done(self) -> bool:
        return self._result is not None

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
    """CKKS-encrypted FedAvg: the server adds ciphertexts it cannot decrypt (NVFlare's HE model)."""

    kind = "ckks"
    capabilities = Capabilities(server_reads_result=False)

    def __init__(self, config: CKKSConfig, keys: KeySource) -> None:
        self.config = config
        self.keys = keys

    def epoch(self, round: int) -> int:
        return 0 if self.config.rotate_keys == "run" else round

    def prepare(self, rounds: int) -> None:
        deal_ahead = getattr(self.keys, "deal_ahead", None)  # key files need no dealing
        if deal_ahead is not None:
            deal_ahead(sorted({self.epoch(r) for r in range(rounds)}))

    def server(self, ctx: RoundContext) -> ServerHalf:
        return CKKSServer(ctx, self.config, self.keys.public(self.epoch(ctx.round)))

    def client(self, ctx: RoundContext, client_id: int, vector: np.ndarray, weight: float, *, integer_noise=None) -> ClientHalf:
        refuse_integer_noise(self, integer_noise)
        if client_id not in ctx.participants:
            raise ValueError(f"client {client_id} is not a participant of round {ctx.round}")
        key = self.keys.client_key(client_id, self.epoch(ctx.round))
        return CKKSClient(ctx, self.config, key, client_id, vector, weight)


def factory(config: CKKSConfig, client_ids: Sequence[int], seed: int) -> CKKSAggregator:
    """``aggregation: {kind: ckks}``: fresh keys for every run (``seed`` is deliberately unused: keys come from the OS)."""
    return CKKSAggregator(config, SimulatedDealer(config, list(client_ids)))
