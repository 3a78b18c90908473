"""The client half of SecAgg / SecAgg+ (Bonawitz et al., CCS 2017; Bell et al., CCS 2020).

A sans-IO state machine: each :meth:`SecAggClient.receive` takes one server frame and returns the
replies. Every check happens before any state changes, so a rejected frame (:class:`ProtocolError`)
leaves the client where it was.

What an honest client enforces against an active server:

* its neighbours come from the public graph (:mod:`.graph`), not from the server, and their
  advertised keys must carry valid Ed25519 signatures under the identities registered before
  round 0 (so the server cannot substitute a neighbour's keys: Bonawitz et al. 2017, §6);
* it answers each stage at most once (replays of any stage are refused);
* consistency (Bonawitz et al. 2017, Fig. 4, Round 4): it signs exactly one survivor set S, one
  that contains itself and at least ``quorum`` clients; it unmasks only for that same S and only
  once ``quorum`` distinct members of S have validly signed it. Two different sets can never both
  collect a quorum (:mod:`.params`), so every honest client that unmasks does so for the same S;
* at unmasking it works out the lists itself: its neighbours in S survived, the others dropped; it
  reveals, for each, *either* the self-mask-seed share (survivor) *or* the mask-key share
  (dropped), never both — and it never answers a second unmask request.
"""

from __future__ import annotations

import os
import struct
from enum import Enum

import numpy as np

from ..base import ClientHalf, ProtocolError, RoundContext
from . import crypto, prg, shamir
from .graph import neighbours_of
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


class _Stage(Enum):
    ADVERTISE = "advertise"
    SHARE = "share keys"
    MASK = "masked input"
    CONSISTENCY = "consistency check"
    UNMASK = "unmask"
    DONE = "done"


def pair_mask_seed(secret: bytes, ctx: RoundContext, a: int, b: int) -> bytes:
    """The 256-bit AES-CTR key of the pairwise mask between ``a`` and ``b`` for this round."""
    return crypto.derive(secret, crypto.MASK_LABEL, ctx.session_id, ctx.round, a, b)


def share_point(client_id: int) -> int:
    """The Shamir evaluation point of a share held by ``client_id`` (ids are >= 0, so points are >= 1)."""
    return client_id + 1


class SecAggClient(ClientHalf):
    """One client's side of one round; holds its update until it is quantised and masked (stage 2)."""

    def __init__(
        self,
        ctx: RoundContext,
        client_id: int,
        vector: np.ndarray,
        weight: float,
        quantizer: Quantizer,
        degree: int,
        threshold: int,
        identities: crypto.Identities,
        integer_noise: np.ndarray | None = None,
        *,
        quorum: int,
    ) -> None:
        vector = np.asarray(vector)
        if vector.shape != (ctx.dim,):
            raise ValueError(f"client {client_id}: update has shape {vector.shape}, round expects ({ctx.dim},)")
        if not np.all(np.isfinite(vector)):
            raise ValueError(f"client {client_id}: update contains NaN or infinity")
        quantizer.check(ctx.dim, weight, integer_noise)  # refuse an over-large weight or noise now
        if client_id not in ctx.participants:
            raise ValueError(f"client {client_id} is not a participant of round {ctx.round}")
        if identities is None or client_id not in identities.private:
            raise ValueError(f"client {client_id} needs its identity key and the registered public keys (crypto.Identities)")
        n = len(ctx.participants)
        if not (n // 2 < quorum <= n):
            raise ValueError(f"quorum {quorum} must be a strict majority of the {n} participants (params.quorum)")
        self.quorum = quorum
        self.ctx = ctx
        self.id = client_id
        self.q = quantizer
        self.t = threshold
        self.identities = identities
        self._vector, self._weight, self._noise = vector, weight, integer_noise
        self._graph_neighbours = neighbours_of(ctx.session_id, ctx.round, ctx.participants, degree, client_id)
        self._stage = _Stage.ADVERTISE
        self._sat_out: str | None = None
        self.revealed: dict[int, str] = {}
        """Which secret's share this client revealed for each peer: ``"seed"`` or ``"key"``."""

    @property
    def done(self) -> bool:
        return self._stage is _Stage.DONE

    @property
    def sat_out(self) -> str | None:
        """Why this client left the round of its own accord (too few live neighbours), if it did."""
        return self._sat_out

    def receive(self, data: bytes) -> list[bytes]:
        handler = {
            _Stage.ADVERTISE: self._advertise,
            _Stage.SHARE: self._share_keys,
            _Stage.MASK: self._masked_input,
            _Stage.CONSISTENCY: self._consistency,
            _Stage.UNMASK: self._unmask,
        }.get(self._stage)
        if handler is None:
            raise ProtocolError(
                f"client {self.id} has finished round {self.ctx.round}; further requests are refused "
                "(a second unmask request could reveal both shares of a peer)"
            )
        return handler(data)

    # ---------------------------------------------------------------- stage 0: advertise keys
    def _advertise(self, data: bytes) -> list[bytes]:
        AdvertiseRequest.decode(data, self.ctx, self.id)
        self._c_sk, c_pk = crypto.new_x25519()
        self._s_sk, s_pk = crypto.new_x25519()
        self._s_pk = s_pk
        sig = self.identities.sign(self.id, crypto.advertise_payload(self.ctx.session_id, self.ctx.round, self.id, c_pk, s_pk))
        self._stage = _Stage.SHARE
        return [Keys(c_pk, s_pk, sig).encode(self.ctx, self.id)]

    # ---------------------------------------------------------------- stage 1: share keys
    def _share_keys(self, data: bytes) -> list[bytes]:
        d = KeyDirectory.decode(data, self.ctx, self.id)
        ids = [int(i) for i in d.ids]
        stray = set(ids) - self._graph_neighbours
        if stray:
            raise ProtocolError(f"key directory lists {sorted(stray)[:5]}, who are not neighbours of client {self.id}")
        self._check_directory(d, ids)
        if len(ids) < self.t:
            return self._sit_out(f"only {len(ids)} live neighbours, threshold {self.t}")
        # Derive every share key first: a bad public key rejects the frame before any state changes.
        share_keys = {
            peer: crypto.derive(
                crypto.agree(self._c_sk, d.c_pks[row].tobytes(), peer=peer),
                crypto.SHARE_LABEL,
                self.ctx.session_id,
                self.ctx.round,
                self.id,
                peer,
            )
            for row, peer in enumerate(ids)
        }
        peer_s_pks = {peer: d.s_pks[row].tobytes() for row, peer in enumerate(ids)}
        self._seed = os.urandom(prg.SEED_BYTES)
        secrets = np.concatenate(
            [
                shamir.bytes_to_elements(crypto.private_bytes(self._s_sk)),
                shamir.bytes_to_elements(self._seed),
            ]
        )
        points = np.array([share_point(p) for p in ids], dtype=np.uint64)
        shares = shamir.split(secrets, points, self.t)  # (m, 2 * SECRET_ELEMENTS)
        cts = np.empty((len(ids), SHARE_CIPHERTEXT_BYTES), dtype=np.uint8)
        for row, peer in enumerate(ids):
            plain = struct.pack(">qq", self.id, peer) + shares[row].astype(">u8").tobytes()
            ad = crypto.share_ad(self.ctx.session_id, self.ctx.round, self.id, peer)
            cts[row] = np.frombuffer(crypto.seal(share_keys[peer], plain, ad), dtype=np.uint8)
        self._share_keys_by_peer = share_keys
        self._peer_s_pks = peer_s_pks
        self._stage = _Stage.MASK
        return [Shares(np.array(ids, dtype=np.int64), cts).encode(self.ctx, self.id)]

    # ---------------------------------------------------------------- stage 2: masked input
    def _masked_input(self, data: bytes) -> list[bytes]:
        b = ShareBundle.decode(data, self.ctx, self.id)
        held: dict[int, np.ndarray] = {}
        for row, peer in enumerate(int(i) for i in b.ids):
            if peer not in self._share_keys_by_peer:
                raise ProtocolError(f"share bundle carries a share from client {peer}, whose keys client {self.id} never got")
            ad = crypto.share_ad(self.ctx.session_id, self.ctx.round, peer, self.id)
            plain = crypto.open_sealed(self._share_keys_by_peer[peer], b.ciphertexts[row].tobytes(), ad, sender=peer)
            sender, receiver = struct.unpack_from(">qq", plain)
            if (sender, receiver) != (peer, self.id):
                raise ProtocolError(f"share from client {peer} names {sender} -> {receiver} inside")
            held[peer] = np.frombuffer(plain, dtype=">u8", offset=16).astype(np.uint64)
        if len(held) < self.t:
            return self._sit_out(f"only {len(held)} neighbours hold shares of its secrets, threshold {self.t}")
        # y = [q, u] + sum_{j > i} PRG(s_ij) - sum_{j < i} PRG(s_ij) + PRG(b_i)   (mod 2^bits)
        y = self.q.encode(self._vector, self._weight, integer_noise=self._noise)
        for peer in sorted(held):
            secret = crypto.agree(self._s_sk, self._peer_s_pks[peer], peer=peer)
            prg.add_mask(y, pair_mask_seed(secret, self.ctx, self.id, peer), +1 if peer > self.id else -1)
        prg.add_mask(y, self._seed, +1)
        self._held = held
        self._vector = self._noise = None  # the plain update is no longer needed
        self._stage = _Stage.CONSISTENCY
        return [MaskedInput(y).encode(self.ctx, self.id)]

    def _check_directory(self, d: KeyDirectory, ids: list[int]) -> None:
        """Every advertised key pair must be signed by its owner's registered identity key."""
        if d.signatures is None:
            raise ProtocolError("key directory carries no signatures: advertised keys must be signed")
        for row, peer in enumerate(ids):
            payload = crypto.advertise_payload(self.ctx.session_id, self.ctx.round, peer, d.c_pks[row].tobytes(), d.s_pks[row].tobytes())
            self.identities.verify(peer, d.signatures[row].tobytes(), payload)

    # ---------------------------------------------------------------- stage 3: consistency check
    def _consistency(self, data: bytes) -> list[bytes]:
        r = ConsistencyRequest.decode(data, self.ctx, self.id)
        survivors = tuple(r.survivors.tolist())
        if self.id not in survivors:
            raise ProtocolError(f"survivor set omits client {self.id}, which sent its masked input: refusing to sign it")
        if len(survivors) < max(self.quorum, self.t):
            raise ProtocolError(
                f"survivor set has {len(survivors)} clients, below the quorum {self.quorum} / threshold {self.t}: refusing to sign it"
            )
        sig = self.identities.sign(self.id, crypto.consistency_payload(self.ctx.session_id, self.ctx.round, survivors))
        self._signed_set = survivors
        self._stage = _Stage.UNMASK
        return [ConsistencySignature(sig).encode(self.ctx, self.id)]

    def _check_consistency(self, r: UnmaskRequest) -> frozenset[int]:
        """S must be the set this client signed, endorsed by ``quorum`` distinct members of S."""
        survivors = tuple(r.survivors.tolist())
        if survivors != self._signed_set:
            raise ProtocolError(
                f"unmask request names a survivor set of {len(survivors)} clients that is not the set of "
                f"{len(self._signed_set)} client {self.id} signed: refusing to unmask (split view?)"
            )
        members = set(survivors)
        signers = r.signers.tolist()
        outsiders = sorted(set(signers) - members)
        if outsiders:
            raise ProtocolError(f"signatures on the survivor set come from {outsiders[:5]}, who are not in it")
        if len(signers) < self.quorum:
            raise ProtocolError(f"only {len(signers)} signatures on the survivor set, quorum is {self.quorum}: refusing to unmask")
        payload = crypto.consistency_payload(self.ctx.session_id, self.ctx.round, survivors)
        for row, signer in enumerate(signers):
            self.identities.verify(signer, r.signatures[row].tobytes(), payload, what="the survivor set")
        return frozenset(members)

    # ---------------------------------------------------------------- stage 4: unmask
    def _unmask(self, data: bytes) -> list[bytes]:
        r = UnmaskRequest.decode(data, self.ctx, self.id)
        members = self._check_consistency(r)
        return self._reveal(set(self._held) & members, set(self._held) - members)

    def _reveal(self, survivors: set[int], dropped: set[int]) -> list[bytes]:
        """One share per neighbour: the self-mask seed's if it survived, the mask key's if it dropped."""
        if survivors & dropped:
            both = sorted(survivors & dropped)[:5]
            raise ProtocolError(f"server lists {both} as both survived and dropped: refusing to reveal both shares")
        if survivors | dropped != set(self._held):
            raise ProtocolError(
                f"server's survivor/dropout lists ({len(survivors)} + {len(dropped)}) are not exactly the "
                f"{len(self._held)} neighbours whose shares client {self.id} holds"
            )
        seed_ids = np.array(sorted(survivors), dtype=np.int64)
        key_ids = np.array(sorted(dropped), dtype=np.int64)
        empty = np.zeros((0, SECRET_ELEMENTS), dtype=np.uint64)
        seed_shares = np.stack([self._held[p][SECRET_ELEMENTS:] for p in seed_ids]) if seed_ids.size else empty
        key_shares = np.stack([self._held[p][:SECRET_ELEMENTS] for p in key_ids]) if key_ids.size else empty
        self.revealed = {**{int(p): "seed" for p in seed_ids}, **{int(p): "key" for p in key_ids}}
        self._stage = _Stage.DONE
        return [Unmask(seed_ids, seed_shares, key_ids, key_shares).encode(self.ctx, self.id)]

    def _sit_out(self, why: str) -> list[bytes]:
        """Leave the round silently: with fewer than t share holders its secrets could not be recovered."""
        self._sat_out = why
        self._vector = self._noise = None
        self._stage = _Stage.DONE
        return []
