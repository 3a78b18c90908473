"""Key agreement, key derivation, share encryption and identity signatures for SecAgg.

Only vetted primitives from ``cryptography``: X25519 (RFC 7748) for both per-round key pairs,
HKDF-SHA256 (RFC 5869) to turn a Diffie-Hellman secret into a purpose-bound key, AES-256-GCM for
the secret shares, Ed25519 (RFC 8032) for the identity signatures (always on).

Binding: every derived key's HKDF ``salt`` is the run's 16-byte session id and its ``info`` names
the purpose, the round and both client ids (smaller first), so a key never serves two purposes,
two rounds, two sessions or two pairs. Share ciphertexts also carry ``session | round | sender |
receiver`` as AES-GCM associated data, so a ciphertext moved to another pair, round or session
fails authentication (Bonawitz et al., CCS 2017, §4 "ShareKeys").
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..base import ProtocolError

KEY_BYTES = 32
SIG_BYTES = 64
NONCE_BYTES = 12
TAG_BYTES = 16

MASK_LABEL = b"fedrlhf/secagg/v1/pairwise-mask"
SHARE_LABEL = b"fedrlhf/secagg/v1/share-key"
SHARE_AD_LABEL = b"fedrlhf/secagg/v1/share"
KEYS_SIG_LABEL = b"fedrlhf/secagg/v1/advertise"
CONSISTENCY_SIG_LABEL = b"fedrlhf/secagg/v1/consistency"


def new_x25519() -> tuple[X25519PrivateKey, bytes]:
    sk = X25519PrivateKey.generate()
    return sk, public_bytes(sk)


def public_bytes(sk: X25519PrivateKey) -> bytes:
    return sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(sk: X25519PrivateKey) -> bytes:
    return sk.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def x25519_from_private(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def agree(sk: X25519PrivateKey, peer_public: bytes, *, peer: int) -> bytes:
    """Raw X25519 shared secret with ``peer``; a malformed or low-order key is a :class:`ProtocolError`."""
    try:
        return sk.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise ProtocolError(f"public key of client {peer} is invalid ({exc})") from exc


def derive(secret: bytes, label: bytes, session_id: bytes, round_index: int, a: int, b: int) -> bytes:
    """A 32-byte key for ``label`` bound to the session, round and the unordered pair {a, b}."""
    lo, hi = min(a, b), max(a, b)
    info = label + struct.pack(">qqq", round_index, lo, hi)
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=session_id, info=info).derive(secret)


def share_ad(session_id: bytes, round_index: int, sender: int, receiver: int) -> bytes:
    return SHARE_AD_LABEL + session_id + struct.pack(">qqq", round_index, sender, receiver)


def seal(key: bytes, plaintext: bytes, ad: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, ad)


def open_sealed(key: bytes, ciphertext: bytes, ad: bytes, *, sender: int) -> bytes:
    try:
        return AESGCM(key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], ad)
    except InvalidTag as exc:
        raise ProtocolError(
            f"share from client {sender} fails authentication (tampered, or bound to another pair, round or session)"
        ) from exc


def advertise_payload(session_id: bytes, round_index: int, client_id: int, c_pk: bytes, s_pk: bytes) -> bytes:
    """What a client signs when it advertises its two public keys."""
    return KEYS_SIG_LABEL + session_id + struct.pack(">qq", round_index, client_id) + c_pk + s_pk


def consistency_payload(session_id: bytes, round_index: int, survivors: Iterable[int]) -> bytes:
    """What a client signs in the consistency round (Bonawitz et al. 2017, Fig. 4, Round 4): the
    session, the round and SHA-256 of the sorted survivor set (so the payload is fixed-size)."""
    ids = np.sort(np.asarray(survivors if isinstance(survivors, (np.ndarray, tuple, list)) else list(survivors), dtype=np.int64))
    digest = hashlib.sha256(ids.astype(">i8").tobytes()).digest()  # the big-endian int64s, as struct ">q" packs them
    return CONSISTENCY_SIG_LABEL + session_id + struct.pack(">qq", round_index, ids.size) + digest


@dataclass
class Identities:
    """Long-term Ed25519 identity keys: public keys everyone knows, private keys of local clients.

    The server gets only ``public``; a client half gets its own private key. Every client signs
    its advertised keys and the survivor set, and every party checks those signatures, so the
    server cannot substitute keys, invent clients or show two survivor sets (Bonawitz et al.
    2017, §6 "active adversary": signatures under a PKI; Fig. 4 Round 4).
    """

    public: dict[int, Ed25519PublicKey] = field(default_factory=dict)
    private: dict[int, Ed25519PrivateKey] = field(default_factory=dict)

    @classmethod
    def generate(cls, client_ids: Iterable[int]) -> Identities:
        """Fresh keys for a simulation in one process (the test and the operator can read ``public``)."""
        ids = cls()
        for cid in client_ids:
            sk = Ed25519PrivateKey.generate()
            ids.private[cid] = sk
            ids.public[cid] = sk.public_key()
        return ids

    @classmethod
    def load(cls, directory: Path, client_ids: Iterable[int]) -> Identities:
        """``<dir>/<cid>.pub`` (raw 32 bytes or PEM) for every client; ``<cid>.key`` (PEM PKCS#8 or raw) where present."""
        ids = cls()
        for cid in client_ids:
            pub_path = directory / f"{cid}.pub"
            if not pub_path.is_file():
                raise FileNotFoundError(f"{pub_path}: identity public key of client {cid} is missing")
            ids.public[cid] = _load_public(pub_path)
            key_path = directory / f"{cid}.key"
            if key_path.is_file():
                ids.private[cid] = _load_private(key_path)
                if public_raw(ids.private[cid].public_key()) != public_raw(ids.public[cid]):
                    raise ValueError(f"{key_path}: private key does not match {pub_path}")
        return ids

    def write(self, directory: Path) -> None:
        """Write ``<cid>.pub`` (raw) and ``<cid>.key`` (PEM PKCS#8, mode 0600) for every known key."""
        directory.mkdir(parents=True, exist_ok=True)
        for cid, pk in self.public.items():
            (directory / f"{cid}.pub").write_bytes(public_raw(pk))
        for cid, sk in self.private.items():
            path = directory / f"{cid}.key"
            path.write_bytes(sk.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
            path.chmod(0o600)

    def sign(self, client_id: int, payload: bytes) -> bytes:
        if client_id not in self.private:
            raise ValueError(f"no identity private key for client {client_id}")
        return self.private[client_id].sign(payload)

    def verify(self, client_id: int, signature: bytes, payload: bytes, *, what: str = "its advertised keys") -> None:
        if client_id not in self.public:
            raise ProtocolError(f"client {client_id} has no registered identity key")
        try:
            self.public[client_id].verify(signature, payload)
        except InvalidSignature as exc:
            raise ProtocolError(f"signature of client {client_id} on {what} is invalid") from exc

    def for_client(self, client_id: int) -> Identities:
        """The view one client gets: everybody's public keys and only its own private key."""
        own = {client_id: self.private[client_id]} if client_id in self.private else {}
        return Identities(dict(self.public), own)

    def public_only(self) -> Identities:
        return Identities(dict(self.public), {})


def public_raw(pk: Ed25519PublicKey) -> bytes:
    return pk.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _load_public(path: Path) -> Ed25519PublicKey:
    data = path.read_bytes()
    if len(data) == KEY_BYTES:
        return Ed25519PublicKey.from_public_bytes(data)
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ValueError(f"{path}: expected 32 raw bytes or a PEM Ed25519 public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: key is {type(key).__name__}, expected Ed25519")
    return key


def _load_private(path: Path) -> Ed25519PrivateKey:
    data = path.read_bytes()
    if len(data) == KEY_BYTES:
        return Ed25519PrivateKey.from_private_bytes(data)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: expected 32 raw bytes or an unencrypted PEM Ed25519 private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: key is {type(key).__name__}, expected Ed25519")
    return key
