"""The SecAgg messages as typed frames on :mod:`aggregation.wire`.

Every frame's header carries the session id (hex), the round and the client id it concerns
(sender for client -> server, receiver for server -> client). Decoders check, in this order and
before using anything: the frame kind, session, round and client id, then each tensor's dtype and
shape, then value ranges (distinct ids, sizes). Any failure is a :class:`ProtocolError` that says
what was wrong, so a replayed frame from another round or session, or one addressed to another
client, is refused by name.

Stages (Bonawitz et al., CCS 2017, Fig. 4; Bell et al., CCS 2020, Alg. 2)::

    server -> all       ADVERTISE_REQUEST
    client -> server    KEYS            two X25519 public keys (+ Ed25519 signature)
    server -> client    KEY_DIRECTORY   the neighbours' public keys
    client -> server    SHARES          one AES-GCM ciphertext of Shamir shares per neighbour
    server -> client    SHARE_BUNDLE    the ciphertexts addressed to that client
    client -> server    MASKED_INPUT    [q, u] + pairwise masks + self mask  (mod 2^bits)
    server -> client    CONSISTENCY_REQUEST  the survivor set S (every client that sent a masked input)
    client -> server    CONSISTENCY_SIGNATURE  Ed25519 signature of (session, round, S)
    server -> client    UNMASK_REQUEST  S again + a quorum of signatures on S from members of S
    client -> server    UNMASK          self-mask shares of survivors, mask-key shares of dropouts

The two consistency frames are Bonawitz et al.'s Round 4 "ConsistencyCheck" (Fig. 4): a client
reveals shares only for the one set it signed, and only once a quorum of clients signed that
same set, so a server cannot tell some holders of a client's shares "it survived" and others "it
dropped" (:mod:`.params` explains the quorum).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .. import wire
from ..base import ProtocolError, RoundContext
from .crypto import KEY_BYTES, NONCE_BYTES, SIG_BYTES, TAG_BYTES

SECRET_ELEMENTS = 5
"""Field elements per 32-byte secret (7-byte chunks)."""
SHARE_PLAINTEXT_BYTES = 16 + 8 * 2 * SECRET_ELEMENTS
"""sender id, receiver id, then the shares of the mask key and of the self-mask seed."""
SHARE_CIPHERTEXT_BYTES = NONCE_BYTES + SHARE_PLAINTEXT_BYTES + TAG_BYTES


def _ids(frame: wire.Frame, name: str, *, max_len: int) -> np.ndarray:
    ids = frame.tensor(name, np.int64, (None,))
    if ids.size > max_len:
        raise wire.WireError(f"{frame.kind}: {name!r} lists {ids.size} clients, at most {max_len} expected")
    if np.unique(ids).size != ids.size:
        raise wire.WireError(f"{frame.kind}: {name!r} lists a client twice")
    return ids


class _Message:
    KIND: ClassVar[str]
    PARTY: ClassVar[str]  # header field naming the client: "sender" or "receiver"

    def _frame(self, ctx: RoundContext, client: int, header: dict, tensors: dict) -> bytes:
        head = {"session": ctx.session_id.hex(), "round": ctx.round, self.PARTY: client, **header}
        return wire.encode(wire.Frame(self.KIND, head, tensors))

    @classmethod
    def _open(cls, data: bytes, ctx: RoundContext, client: int, max_bytes: int) -> wire.Frame:
        """Decode and check kind, session, round and client id; WireError -> ProtocolError."""
        try:
            frame = wire.decode(data, expect=cls.KIND, max_bytes=max_bytes)
            session = frame.field("session", str)
            rnd = frame.field("round", int)
            who = frame.field(cls.PARTY, int)
        except wire.WireError as exc:
            raise ProtocolError(str(exc)) from exc
        if session != ctx.session_id.hex():
            raise ProtocolError(f"{cls.KIND}: frame belongs to session {session[:8]}..., not this session")
        if rnd != ctx.round:
            raise ProtocolError(f"{cls.KIND}: frame is for round {rnd}, this is round {ctx.round} (replayed?)")
        if who != client:
            raise ProtocolError(f"{cls.KIND}: frame names client {who} as {cls.PARTY}, expected {client}")
        return frame


def _checked(fn):
    """Turn wire errors from tensor/field access into ProtocolError."""

    def inner(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except wire.WireError as exc:
            raise ProtocolError(str(exc)) from exc

    return inner


@dataclass(frozen=True)
class AdvertiseRequest(_Message):
    KIND: ClassVar[str] = "secagg/advertise-request"
    PARTY: ClassVar[str] = "receiver"

    def encode(self, ctx: RoundContext, receiver: int) -> bytes:
        return self._frame(ctx, receiver, {}, {})

    @classmethod
    @_checked
    def decode(cls, data: bytes, ctx: RoundContext, receiver: int) -> AdvertiseRequest:
        cls._open(data, ctx, receiver, 1 << 12)
        return cls()


@dataclass(frozen=True)
class Keys(_Message):
    KIND: ClassVar[str] = "secagg/keys"
    PARTY: ClassVar[str] = "sender"
    c_pk: bytes
    s_pk: bytes
    signature: bytes | None

    def encode(self, ctx: RoundContext, sender: int) -> bytes:
        t = {"c_pk": wire.as_blob(self.c_pk), "s_pk": wire.as_blob(self.s_pk)}
        if self.signature is not None:
            t["signature"] = wire.as_blob(self.signature)
        return self._frame(ctx, sender, {}, t)

    @classmethod
    @_checked
    def decode(cls, data: bytes, ctx: RoundContext, sender: int) -> Keys:
        f = cls._open(data, ctx, sender, 1 << 12)
        sig = f.blob("signature", exact=SIG_BYTES) if "signature" in f.tensors else None
        return cls(f.blob("c_pk", exact=KEY_BYTES), f.blob("s_pk", exact=KEY_BYTES), sig)


@dataclass(frozen=True)
class KeyDirectory(_Message):
    """The public keys of the receiver's neighbours that advertised."""

    KIND: ClassVar[str] = "secagg/key-directory"
    PARTY: ClassVar[str] = "receiver"
    ids: np.ndarray
    c_pks: np.ndarray  # (m, 32) uint8
    s_pks: np.ndarray
    signatures: np.ndarray | None  # (m, 64) uint8

    def encode(self, ctx: RoundContext, receiver: int) -> bytes:
        t = {"ids": self.ids.astype(np.int64), "c_pks": self.c_pks, "s_pks": self.s_pks}
        if self.signatures is not None:
            t["signatures"] = self.signatures
        return self._frame(ctx, receiver, {}, t)

    @classmethod
    @_checked
    def decode(cls, data: bytes, ctx: RoundContext, receiver: int) -> KeyDirectory:
        n = len(ctx.participants)
        f = cls._open(data, ctx, receiver, 1 << 26)
        ids = _ids(f, "ids", max_len=n)
        m = ids.size
        sigs = f.tensor("signatures", np.uint8, (m, SIG_BYTES)) if "signatures" in f.tensors else None
        return cls(ids, f.tensor("c_pks", np.uint8, (m, KEY_BYTES)), f.tensor("s_pks", np.uint8, (m, KEY_BYTES)), sigs)


@dataclass(frozen=True)
class Shares(_Message):
    """One ciphertext per neighbour: ``ciphertexts[i]`` is for client ``ids[i]``."""

    KIND: ClassVar[str] = "secagg/shares"
    PARTY: ClassVar[str] = "sender"
    ids: np.ndarray
    ciphertexts: np.ndarray  # (m, SHARE_CIPHERTEXT_BYTES) uint8

    def encode(self, ctx: RoundContext, sender: int) -> bytes:
        return self._frame(ctx, sender, {}, {"ids": self.ids.astype(np.int64), "ciphertexts": self.ciphertexts})

    @classmethod
    @_checked
    def decode(cls, data: bytes, ctx: RoundContext, sender: int) -> Shares:
        f = cls._open(data, ctx, sender, 1 << 26)
        ids = _ids(f, "ids", max_len=len(ctx.participants))
        return cls(ids, f.tensor("ciphertexts", np.uint8, (ids.size, SHARE_CIPHERTEXT_BYTES)))


@dataclass(frozen=True)
class ShareBundle(_Message):
    """The ciphertexts addressed to the receiver: ``ciphertexts[i]`` comes from client ``ids[i]``."""

    KIND: ClassVar[str] = "secagg/share-bundle"
    PARTY: ClassVar[str] = "receiver"
    ids: np.ndarray
    ciphertexts: np.ndarray

    def encode(self, ctx: RoundContext, receiver: int) -> bytes:
        return self._frame(ctx, receiver, {}, {"ids": self.ids.astype(np.int64), "ciphertexts": self.ciphertexts})

    @classmethod
    @_checked
    def decode(cls, data: bytes, ctx: RoundContext, receiver: int) -> ShareBundle:
        f = cls._open(data, ctx, receiver, 1 << 26)
        ids = _ids(f, "ids", max_len=len(ctx.participants))
        return cls(ids, f.tensor("ciphertexts", np.uint8, (ids.size, SHARE_CIPHERTEXT_BYTES)))


@dataclass(frozen=True)
class MaskedInput(_Message):
    KIND: ClassVar[str] = "secagg/masked-input"
    PARTY: ClassVar[str] = "sender"
    vector: np.ndarray  # (dim + 1,) uint32 or uint64

    def encode(self, ctx: RoundContext, sender: int) -> bytes:
        return self._frame(ctx, sender, {}, {"masked": self.vector})

    @classmethod
    @_checked
    def decode(cls, data: bytes, ctx: RoundContext, sender: int, dtype: np.dtype) -> MaskedInput:
        f = cls._open(data, ctx, sender, 64 + 4096 + (ctx.dim + 1) * np.dtype(dtype).itemsize)
        return cls(f.tensor("masked", dtype, (ctx.dim + 1,)))


@dataclass(frozen=True)
class ConsistencyRequest(_Message):
    """The survivor set S the server claims: every client whose masked input it summed (sorted ids)."""

    KIND: ClassVar[str] = "secagg/consistency-request"
    PARTY: ClassVar[str] = "receiver"
    survivors: np.ndarray

    def encode(self, ctx: RoundContext, receiver: int) -> bytes:
        return self._frame(ctx, receiver, {}, {"survivors": self.survivors.astype(np.int64)})

    @classmethod
    @_checked
    def decode(cls, data: bytes, ctx: RoundContext, receiver: int) -> ConsistencyRequest:
        n = len(ctx.participants)
        f = cls._open(data, ctx, receiver, 4096 + 8 * n)
        return cls(_survivor_set(f, ctx))


@dataclass(frozen=True)
class ConsistencySignature(_Message):
    """A client's Ed25519 signature of :func:`.crypto.consistency_payload` over the set it was shown."""

    KIND: ClassVar[str] = "secagg/consistency-signature"
    PARTY: ClassVar[str] = "sender"
    signature: bytes

    def encode(self, ctx: RoundContext, sender: int) -> bytes:
        return self._frame(ctx, sender, {}, {"signature": wire.as_blob(self.signature)})

    @classmethod
    @_checked
    def decode(cls, data: bytes, ctx: RoundContext, sender: int) -> ConsistencySignature:
        f = cls._open(data, ctx, sender, 1 << 12)
        return cls(f.blob("signature", exact=SIG_BYTES))


@dataclass(frozen=True)
class UnmaskRequest(_Message):
    """The survivor set S once more, with signatures on it: ``signatures[i]`` is client ``signers[i]``'s.

    The receiver itself works out which of the neighbours whose shares it holds survived (in S)
    and which dropped (not in S): the server names no per-client lists any more.
    """

    KIND: ClassVar[str] = "secagg/unmask-request"
    PARTY: ClassVar[str] = "receiver"
    survivors: np.ndarray
    signers: np.ndarray
    signatures: np.ndarray  # (m, SIG_BYTES) uint8

    def encode(self, ctx: RoundContext, receiver: int) -> bytes:
        return self._frame(
            ctx,
            receiver,
            {},
            {"survivors": self.survivors.astype(np.int64), "signers": self.signers.astype(np.int64), "signatures": self.signatures},
        )

    @classmethod
    @_checked
    def decode(cls, data: bytes, ctx: RoundContext, receiver: int) -> UnmaskRequest:
        n = len(ctx.participants)
        f = cls._open(data, ctx, receiver, 4096 + (8 + 8 + SIG_BYTES) * n + 1024)
        survivors = _survivor_set(f, ctx)
        signers = _ids(f, "signers", max_len=n)
        return cls(survivors, signers, f.tensor("signatures", np.uint8, (signers.size, SIG_BYTES)))


def _survivor_set(f: wire.Frame, ctx: RoundContext) -> np.ndarray:
    """A strictly increasing list of participants (the canonical form every client signs)."""
    ids = _ids(f, "survivors", max_len=len(ctx.participants))
    if ids.size > 1 and np.any(np.diff(ids) <= 0):
        raise wire.WireError(f"{f.kind}: 'survivors' is not sorted")
    if not set(ids.tolist()) <= set(ctx.participants):
        raise wire.WireError(f"{f.kind}: 'survivors' names clients outside the round")
    return ids


@dataclass(frozen=True)
class Unmask(_Message):
    """Self-mask-seed shares of surviving neighbours, mask-key shares of dropped ones."""

    KIND: ClassVar[str] = "secagg/unmask"
    PARTY: ClassVar[str] = "sender"
    seed_ids: np.ndarray
    seed_shares: np.ndarray  # (a, SECRET_ELEMENTS) uint64
    key_ids: np.ndarray
    key_shares: np.ndarray  # (b, SECRET_ELEMENTS) uint64

    def encode(self, ctx: RoundContext, sender: int) -> bytes:
        return self._frame(
            ctx,
            sender,
            {},
            {
                "seed_ids": self.seed_ids.astype(np.int64),
                "seed_shares": self.seed_shares,
                "key_ids": self.key_ids.astype(np.int64),
                "key_shares": self.key_shares,
            },
        )

    @classmethod
    @_checked
    def decode(cls, data: bytes, ctx: RoundContext, sender: int) -> Unmask:
        n = len(ctx.participants)
        f = cls._open(data, ctx, sender, 1 << 26)
        seed_ids, key_ids = _ids(f, "seed_ids", max_len=n), _ids(f, "key_ids", max_len=n)
        return cls(
            seed_ids,
            f.tensor("seed_shares", np.uint64, (seed_ids.size, SECRET_ELEMENTS)),
            key_ids,
            f.tensor("key_shares", np.uint64, (key_ids.size, SECRET_ELEMENTS)),
        )
