"""The server half of SecAgg / SecAgg+: routes keys and shares, sums masked inputs, unmasks.

The server sums masked vectors as they arrive (one running ``[q, u]`` sum mod 2^bits, never a
stored copy per client), then, from the unmask answers, reconstructs in one batched Lagrange
interpolation every self-mask seed of a survivor and every mask key of a client that dropped
after sharing, and removes those masks: one PRG call per seed and per (dropped, survivor) pair.

Between the masked inputs and the unmask requests runs Bonawitz et al.'s consistency round
(CCS 2017, Fig. 4, Round 4): every survivor signs the survivor set S, and the server forwards a
quorum of those signatures with S; an honest server checks each signature as it arrives, so one
client's bad signature costs only that client.

Aborts (:class:`AggregationAborted`, nothing is revealed because no unmasking has happened or
the needed shares are missing): fewer than ``t`` clients at any stage, fewer than ``quorum``
signatures on S, or a secret whose holders returned fewer than ``t`` shares. A reconstructed mask key is checked against the public key its
owner advertised, so a client that sends a corrupt share causes a clear abort, not a wrong sum.
"""

from __future__ import annotations

from enum import Enum

import numpy as np

from ..base import AggregateResult, AggregationAborted, ProtocolError, RoundContext, ServerHalf
from . import crypto, prg, shamir
from .client import pair_mask_seed, share_point
from .graph import neighbours
from .messages import (
    SECRET_ELEMENTS,
    SHARE_CIPHERTEXT_BYTES,
    AdvertiseRequest,
    ConsistencyRequest,
    ConsistencySignature,
    KeyDirectory,
    Keys,
    MaskedInput,
    ShareBundle,
    Shares,
    Unmask,
    UnmaskRequest,
)
from .quantize import Quantizer

Outgoing = tuple[int, bytes]


class _Stage(Enum):
    ADVERTISE = "advertise keys"
    SHARE = "share keys"
    MASK = "masked input"
    CONSISTENCY = "consistency check"
    UNMASK = "unmask"
    DONE = "done"


class SecAggServer(ServerHalf):
    def __init__(
        self,
        ctx: RoundContext,
        quantizer: Quantizer,
        degree: int,
        threshold: int,
        identities: crypto.Identities,
        *,
        quorum: int,
    ) -> None:
        if identities is None:
            raise ValueError("the SecAgg server needs the registered identity public keys (crypto.Identities)")
        self.ctx = ctx
        self.quorum = quorum
        self.q = quantizer
        self.k = degree
        self.t = threshold
        self.identities = identities
        self._participants = set(ctx.participants)
        self._graph = neighbours(ctx.session_id, ctx.round, ctx.participants, degree)
        self._stage = _Stage.ADVERTISE
        self._keys: dict[int, Keys] = {}
        self._outbox: dict[int, dict[int, np.ndarray]] = {}  # receiver -> {sender: ciphertext}
        self._shared_to: dict[int, set[int]] = {}  # sender -> receivers of its shares
        self._sum = np.zeros(ctx.dim + 1, dtype=quantizer.dtype)
        self._masked: set[int] = set()
        self._consistency: dict[int, bytes] = {}  # signer -> signature on the survivor set
        self._survivor_set: tuple[int, ...] = ()
        self._requested: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._unmask: dict[int, Unmask] = {}
        self._result: AggregateResult | None = None

    @property
    def stage(self) -> str:
        return self._stage.value

    @property
    def done(self) -> bool:
        return self._stage is _Stage.DONE

    def result(self) -> AggregateResult | None:
        return self._result

    # ---------------------------------------------------------------- driving
    def start(self) -> list[Outgoing]:
        n = len(self.ctx.participants)
        if n < 2 or self.k < 1:
            raise AggregationAborted(f"secure aggregation needs at least 2 participants, round {self.ctx.round} has {n}")
        if self.t > self.k:
            raise AggregationAborted(
                f"round {self.ctx.round} has {n} participants, so {self.k} neighbours each; threshold {self.t} cannot be met"
            )
        return [(cid, AdvertiseRequest().encode(self.ctx, cid)) for cid in self.ctx.participants]

    def receive(self, sender: int, data: bytes) -> list[Outgoing]:
        if sender not in self._participants:
            raise ProtocolError(f"client {sender} is not a participant of round {self.ctx.round}")
        handler = {
            _Stage.ADVERTISE: self._on_keys,
            _Stage.SHARE: self._on_shares,
            _Stage.MASK: self._on_masked,
            _Stage.CONSISTENCY: self._on_signature,
            _Stage.UNMASK: self._on_unmask,
        }.get(self._stage)
        if handler is None:
            raise ProtocolError(f"round {self.ctx.round} is finished; message from client {sender} rejected")
        handler(sender, data)
        return self.close_stage() if self._all_answered() else []

    def close_stage(self) -> list[Outgoing]:
        step = {
            _Stage.ADVERTISE: self._send_directories,
            _Stage.SHARE: self._send_bundles,
            _Stage.MASK: self._send_consistency_requests,
            _Stage.CONSISTENCY: self._send_unmask_requests,
            _Stage.UNMASK: self._finish,
        }.get(self._stage)
        if step is None:
            return []
        return step()

    def _expected(self) -> set[int] | dict:
        if self._stage is _Stage.ADVERTISE:
            return self._participants
        if self._stage is _Stage.SHARE:
            return self._keys
        if self._stage is _Stage.MASK:
            return self._shared_to
        if self._stage is _Stage.CONSISTENCY:
            return self._masked
        return self._requested

    def _answered(self) -> set[int] | dict:
        return {
            _Stage.ADVERTISE: self._keys,
            _Stage.SHARE: self._shared_to,
            _Stage.MASK: self._masked,
            _Stage.CONSISTENCY: self._consistency,
            _Stage.UNMASK: self._unmask,
        }.get(self._stage, set())

    def _all_answered(self) -> bool:
        """Every expected client answered. Each handler accepts only an expected sender (participant,
        advertised keys, shared, masked, asked to unmask) and refuses repeats, so the answers are a
        subset of the expected clients and comparing sizes is enough: O(1) per message, not O(n)."""
        return self._stage is not _Stage.DONE and len(self._answered()) >= len(self._expected())

    def _refuse_repeat(self, sender: int, answered: set[int] | dict) -> None:
        if sender in answered:
            raise ProtocolError(f"client {sender} already answered stage '{self._stage.value}' (replayed?)")

    def _require(self, count: int, what: str) -> None:
        if count < self.t:
            self._stage = _Stage.DONE
            raise AggregationAborted(
                f"round {self.ctx.round}: only {count} clients {what}, threshold is {self.t}; aborted, nothing revealed"
            )

    # ---------------------------------------------------------------- stage 0 -> 1
    def _on_keys(self, sender: int, data: bytes) -> None:
        self._refuse_repeat(sender, self._keys)
        msg = Keys.decode(data, self.ctx, sender)
        if msg.signature is None:
            raise ProtocolError(f"keys of client {sender} are unsigned: advertised keys must be signed")
        self.identities.verify(
            sender, msg.signature, crypto.advertise_payload(self.ctx.session_id, self.ctx.round, sender, msg.c_pk, msg.s_pk)
        )
        if msg.c_pk == msg.s_pk:
            raise ProtocolError(f"client {sender} advertised the same key twice")
        self._keys[sender] = msg

    def _send_directories(self) -> list[Outgoing]:
        self._require(len(self._keys), "advertised keys")
        out = []
        for cid in sorted(self._keys):
            peers = sorted(p for p in self._graph[cid] if p in self._keys)
            ks = [self._keys[p] for p in peers]
            directory = KeyDirectory(
                np.array(peers, dtype=np.int64),
                _blobs([k.c_pk for k in ks], crypto.KEY_BYTES),
                _blobs([k.s_pk for k in ks], crypto.KEY_BYTES),
                _blobs([k.signature for k in ks], crypto.SIG_BYTES),
            )
            out.append((cid, directory.encode(self.ctx, cid)))
        self._stage = _Stage.SHARE
        return out

    # ---------------------------------------------------------------- stage 1 -> 2
    def _on_shares(self, sender: int, data: bytes) -> None:
        if sender not in self._keys:
            raise ProtocolError(f"client {sender} sent shares but never advertised keys")
        self._refuse_repeat(sender, self._shared_to)
        msg = Shares.decode(data, self.ctx, sender)
        receivers = [int(i) for i in msg.ids]
        allowed = {p for p in self._graph[sender] if p in self._keys}
        if not set(receivers) <= allowed:
            raise ProtocolError(f"client {sender} addressed shares to {sorted(set(receivers) - allowed)[:5]}, not its live neighbours")
        if len(receivers) < self.t:
            raise ProtocolError(f"client {sender} sent {len(receivers)} shares, threshold is {self.t}")
        for row, rcv in enumerate(receivers):
            self._outbox.setdefault(rcv, {})[sender] = msg.ciphertexts[row]
        self._shared_to[sender] = set(receivers)

    def _send_bundles(self) -> list[Outgoing]:
        self._require(len(self._shared_to), "shared their keys")
        out = []
        u2 = set(self._shared_to)
        for cid in sorted(u2):
            inbox = {s: ct for s, ct in self._outbox.get(cid, {}).items() if s in u2}
            senders = sorted(inbox)
            cts = np.stack([inbox[s] for s in senders]) if senders else np.zeros((0, SHARE_CIPHERTEXT_BYTES), np.uint8)
            out.append((cid, ShareBundle(np.array(senders, dtype=np.int64), cts).encode(self.ctx, cid)))
        self._outbox.clear()
        self._stage = _Stage.MASK
        return out

    # ---------------------------------------------------------------- stage 2 -> 3
    def _on_masked(self, sender: int, data: bytes) -> None:
        if sender not in self._shared_to:
            raise ProtocolError(f"client {sender} sent a masked input but did not share its keys")
        self._refuse_repeat(sender, self._masked)
        msg = MaskedInput.decode(data, self.ctx, sender, self.q.dtype)
        self._sum += msg.vector
        self._masked.add(sender)

    def _holders(self, owner: int) -> set[int]:
        """Clients that hold ``owner``'s shares: it sent them one and they got their bundle (both in U2)."""
        return {r for r in self._shared_to.get(owner, ()) if r in self._shared_to}

    def _send_consistency_requests(self) -> list[Outgoing]:
        self._require(len(self._masked), "sent masked inputs")
        self._require_quorum(len(self._masked), "sent masked inputs")
        self._survivor_set = tuple(sorted(self._masked))
        request = ConsistencyRequest(np.array(self._survivor_set, dtype=np.int64))
        self._stage = _Stage.CONSISTENCY
        return [(cid, request.encode(self.ctx, cid)) for cid in self._survivor_set]

    def _require_quorum(self, count: int, what: str) -> None:
        if count < self.quorum:
            self._stage = _Stage.DONE
            raise AggregationAborted(
                f"round {self.ctx.round}: only {count} clients {what}, the consistency quorum is {self.quorum}; aborted, nothing revealed"
            )

    # ---------------------------------------------------------------- stage 3 -> 4
    def _on_signature(self, sender: int, data: bytes) -> None:
        if sender not in self._masked:
            raise ProtocolError(f"client {sender} signed the survivor set but sent no masked input")
        self._refuse_repeat(sender, self._consistency)
        msg = ConsistencySignature.decode(data, self.ctx, sender)
        payload = crypto.consistency_payload(self.ctx.session_id, self.ctx.round, self._survivor_set)
        self.identities.verify(sender, msg.signature, payload, what="the survivor set")
        self._consistency[sender] = msg.signature

    def _send_unmask_requests(self) -> list[Outgoing]:
        self._require(len(self._consistency), "signed the survivor set")
        self._require_quorum(len(self._consistency), "signed the survivor set")
        u4 = set(self._consistency)
        signers = sorted(u4)[: self.quorum]  # a quorum is all a client needs to check
        sigs = _blobs([self._consistency[s] for s in signers], crypto.SIG_BYTES)
        survivors = np.array(self._survivor_set, dtype=np.int64)
        signer_ids = np.array(signers, dtype=np.int64)
        return self._request_unmask(UnmaskRequest(survivors, signer_ids, sigs), u4)

    def _request_unmask(self, request: UnmaskRequest, recipients) -> list[Outgoing]:
        """Send ``request`` to ``recipients`` and remember, per recipient, which of the shares it holds
        belong to survivors (reveal b) and to dropped clients (reveal the mask key)."""
        u2, u3 = set(self._shared_to), self._masked
        held_by: dict[int, list[int]] = {cid: [] for cid in recipients}
        for owner in u2:
            for holder in self._holders(owner):
                if holder in held_by:
                    held_by[holder].append(owner)
        out = []
        for cid in sorted(recipients):
            held = held_by[cid]
            surv = np.array(sorted(p for p in held if p in u3), dtype=np.int64)
            drop = np.array(sorted(p for p in held if p not in u3), dtype=np.int64)
            self._requested[cid] = (surv, drop)
            out.append((cid, request.encode(self.ctx, cid)))
        self._stage = _Stage.UNMASK
        return out

    # ---------------------------------------------------------------- stage 4 -> done
    def _on_unmask(self, sender: int, data: bytes) -> None:
        if sender not in self._requested:
            raise ProtocolError(f"client {sender} was not asked to unmask")
        self._refuse_repeat(sender, self._unmask)
        msg = Unmask.decode(data, self.ctx, sender)
        surv, drop = self._requested[sender]
        if not (np.array_equal(np.sort(msg.seed_ids), surv) and np.array_equal(np.sort(msg.key_ids), drop)):
            raise ProtocolError(f"unmask answer of client {sender} does not match the shares it was asked for")
        if np.any(msg.seed_shares >= np.uint64(shamir.P)) or np.any(msg.key_shares >= np.uint64(shamir.P)):
            raise ProtocolError(f"unmask answer of client {sender} has a share outside the field")
        self._unmask[sender] = msg

    def _collect(self, owners: list[int], which: str) -> tuple[np.ndarray, np.ndarray]:
        """``t`` share points and shares of each owner's secret, as ``(len(owners), t)`` / ``(..., t, 5)``."""
        points: dict[int, list[int]] = {o: [] for o in owners}
        shares: dict[int, list[np.ndarray]] = {o: [] for o in owners}
        for holder, msg in self._unmask.items():
            ids, sh = (msg.seed_ids, msg.seed_shares) if which == "seed" else (msg.key_ids, msg.key_shares)
            for row, owner in enumerate(ids):
                o = int(owner)
                if o in points and len(points[o]) < self.t:
                    points[o].append(share_point(holder))
                    shares[o].append(sh[row])
        short = [(o, len(points[o])) for o in owners if len(points[o]) < self.t]
        if short:
            self._stage = _Stage.DONE
            o, got = short[0]
            what = "self-mask seed" if which == "seed" else "mask key"
            raise AggregationAborted(
                f"round {self.ctx.round}: the {what} of client {o} has only {got} of {self.t} shares "
                f"({len(short)} secrets short); aborted, nothing revealed"
            )
        xs = np.array([points[o] for o in owners], dtype=np.uint64).reshape(len(owners), self.t)
        ys = np.array([shares[o] for o in owners], dtype=np.uint64).reshape(len(owners), self.t, SECRET_ELEMENTS)
        return xs, ys

    def _finish(self) -> list[Outgoing]:
        u3 = sorted(self._masked)
        dropped = sorted(p for p in self._shared_to if p not in self._masked and self._holders(p) & self._masked)
        seed_xs, seed_ys = self._collect(u3, "seed")
        key_xs, key_ys = self._collect(dropped, "key")
        xs = np.concatenate([seed_xs, key_xs]) if dropped else seed_xs
        ys = np.concatenate([seed_ys, key_ys]) if dropped else seed_ys
        secrets = shamir.reconstruct(xs, ys)
        total = self._sum
        for row, owner in enumerate(u3):
            try:
                seed = shamir.elements_to_bytes(secrets[row], prg.SEED_BYTES)
            except ValueError as exc:
                self._stage = _Stage.DONE
                raise AggregationAborted(f"self-mask seed of client {owner} did not reconstruct ({exc})") from exc
            prg.add_mask(total, seed, -1)
        for row, owner in enumerate(dropped, start=len(u3)):
            try:
                sk = crypto.x25519_from_private(shamir.elements_to_bytes(secrets[row], crypto.KEY_BYTES))
            except ValueError as exc:
                self._stage = _Stage.DONE
                raise AggregationAborted(f"mask key of dropped client {owner} did not reconstruct ({exc})") from exc
            if crypto.public_bytes(sk) != self._keys[owner].s_pk:
                self._stage = _Stage.DONE
                raise AggregationAborted(
                    f"reconstructed mask key of dropped client {owner} does not match its advertised key (corrupt shares)"
                )
            for peer in sorted(self._holders(owner) & self._masked):
                secret = crypto.agree(sk, self._keys[peer].s_pk, peer=peer)
                # ``peer`` added +mask if owner > peer, else -mask: undo it.
                prg.add_mask(total, pair_mask_seed(secret, self.ctx, peer, owner), -1 if owner > peer else +1)
        weighted_sum, total_weight = self.q.decode(total)
        self._result = AggregateResult(weighted_sum, total_weight, tuple(u3))
        self._stage = _Stage.DONE
        return []


def _blobs(values: list[bytes | None], width: int) -> np.ndarray:
    if not values:
        return np.zeros((0, width), dtype=np.uint8)
    return np.frombuffer(b"".join(values), dtype=np.uint8).reshape(len(values), width)
