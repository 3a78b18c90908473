"""CKKS key setup: a dealer makes each key epoch's secret context and delivers it to every client.

The CKKS secret key must exist only on the client side (the server would otherwise decrypt every
update). A dealer — the offline ``fedrlhf keys deal`` command, or in the in-process simulation a
party separate from the server — creates a fresh TenSEAL context per key epoch (per run, or per
round with ``rotate_keys: round``) and produces:

* for the server, the **public context**: the parameters only, no key of any kind (symmetric
  CKKS: the clients encrypt with the secret key), signed by the dealer;
* for each client ``k``, a **key package**: the secret context encrypted to ``k``'s X25519 public
  key (ephemeral-static X25519, HKDF-SHA256, AES-256-GCM — ECIES as in RFC 9180's base mode) and
  signed with the dealer's Ed25519 key, which every client pins.

Everything that identifies the package — domain string, client id, epoch, key id, the parameter
set, the ephemeral key, the hash of the public context — is in the signed header and is AES-GCM
associated data, and the HKDF info binds the ephemeral and recipient keys and ids. So a package
forged without the dealer's key, swapped to another client, moved to another epoch or key, or
altered in any byte is rejected (:class:`KeyPackageError`) before any secret is used.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import tenseal as ts
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .. import wire
from ..base import ProtocolError
from .masking import check_key
from .params import (
    MAX_PUBLIC_CONTEXT_BYTES,
    MAX_SECRET_CONTEXT_BYTES,
    CKKSConfig,
    load_context,
    new_secret_context,
    public_context_bytes,
    secret_context_bytes,
)

PACKAGE = "ckks/key-package"
PUBLIC = "ckks/public-context"
DOMAIN_PACKAGE = b"fedrlhf/ckks/key-package/v1"
DOMAIN_PUBLIC = b"fedrlhf/ckks/public-context/v1"
KEY_ID_BYTES = 16
MAX_PACKAGE_BYTES = MAX_SECRET_CONTEXT_BYTES + (1 << 16)


class KeyPackageError(ProtocolError):
    """A key package or public context failed authentication or does not fit this run."""


def _raw(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _private_raw(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


@dataclass(frozen=True)
class ClientKeyPair:
    """A client's X25519 key pair for receiving key packages (made on the client; the private half stays)."""

    client_id: int
    private: X25519PrivateKey

    @classmethod
    def generate(cls, client_id: int) -> ClientKeyPair:
        return cls(client_id, X25519PrivateKey.generate())

    @classmethod
    def from_bytes(cls, client_id: int, raw: bytes) -> ClientKeyPair:
        if len(raw) != 32:
            raise ValueError(f"an X25519 private key is 32 bytes, got {len(raw)}")
        return cls(client_id, X25519PrivateKey.from_private_bytes(raw))

    @property
    def public_bytes(self) -> bytes:
        return _raw(self.private.public_key())

    @property
    def private_bytes(self) -> bytes:
        return _private_raw(self.private)


@dataclass(frozen=True)
class DealerKey:
    """The dealer's Ed25519 signing key; clients and server pin its public half (:attr:`verify_bytes`)."""

    signing: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> DealerKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_bytes(cls, raw: bytes) -> DealerKey:
        if len(raw) != 32:
            raise ValueError(f"an Ed25519 private key is 32 bytes, got {len(raw)}")
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    @property
    def verify_bytes(self) -> bytes:
        return _raw(self.signing.public_key())

    @property
    def private_bytes(self) -> bytes:
        return _private_raw(self.signing)


def _params(config: CKKSConfig) -> dict[str, Any]:
    return {
        "poly_modulus_degree": config.poly_modulus_degree,
        "coeff_mod_bit_sizes": list(config.coeff_mod_bit_sizes),
        "scale_bits": config.scale_bits,
    }


def _canonical(header: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(header), sort_keys=True, separators=(",", ":")).encode()


def _package_key(shared: bytes, key_id: bytes, eph: bytes, recipient: bytes, client_id: int, epoch: int) -> bytes:
    info = DOMAIN_PACKAGE + eph + recipient + client_id.to_bytes(8, "big") + epoch.to_bytes(8, "big", signed=True)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=key_id, info=info).derive(shared)


@dataclass(frozen=True)
class PublicContext:
    """What the server holds for one key epoch: parameters only, signed by the dealer."""

    key_id: bytes
    epoch: int
    context: bytes
    signature: bytes

    def _message(self, config: CKKSConfig) -> bytes:
        header = {"key_id": self.key_id.hex(), "epoch": self.epoch, "params": _params(config)}
        return DOMAIN_PUBLIC + _canonical(header) + hashlib.sha256(self.context).digest()

    def encode(self, config: CKKSConfig) -> bytes:
        header = {"key_id": self.key_id.hex(), "epoch": self.epoch, "params": _params(config)}
        return wire.encode(wire.Frame(PUBLIC, header, {"context": wire.as_blob(self.context), "signature": wire.as_blob(self.signature)}))

    @classmethod
    def decode(cls, data: bytes, config: CKKSConfig, dealer_verify: bytes) -> PublicContext:
        """Parse and authenticate (dealer signature, parameter set) a public context file or message."""
        try:
            frame = wire.decode(data, expect=PUBLIC, max_bytes=MAX_PUBLIC_CONTEXT_BYTES + 4096)
            key_id = _hex(frame.field("key_id", str), KEY_ID_BYTES, "key_id")
            epoch = frame.field("epoch", int)
            params = frame.field("params", dict)
            context = frame.blob("context", max_bytes=MAX_PUBLIC_CONTEXT_BYTES)
            signature = frame.blob("signature", exact=64)
        except wire.WireError as exc:
            raise KeyPackageError(f"public context: {exc}") from exc
        if params != _params(config):
            raise KeyPackageError(f"public context is for parameters {params}, this run uses {_params(config)}")
        pc = cls(key_id, epoch, context, signature)
        try:
            Ed25519PublicKey.from_public_bytes(dealer_verify).verify(signature, pc._message(config))
        except InvalidSignature as exc:
            raise KeyPackageError("public context is not signed by the pinned dealer key") from exc
        return pc

    def load(self, config: CKKSConfig) -> ts.Context:
        """The server's TenSEAL context; refuses one that holds a secret key."""
        try:
            return load_context(self.context, config, secret=False)
        except ValueError as exc:
            raise KeyPackageError(f"public context: {exc}") from exc


@dataclass(frozen=True)
class Deal:
    """One key epoch as dealt: the server's public context and one sealed package per client."""

    public: PublicContext
    packages: dict[int, bytes]


def deal(config: CKKSConfig, recipients: Mapping[int, bytes], dealer: DealerKey, epoch: int) -> Deal:
    """Make a fresh CKKS key and seal it to each client's X25519 public key (``recipients[cid]``)."""
    ctx = new_secret_context(config)
    secret = secret_context_bytes(ctx)
    public = public_context_bytes(ctx)
    del ctx
    key_id = os.urandom(KEY_ID_BYTES)
    pub = PublicContext(key_id, epoch, public, b"")
    pub = PublicContext(key_id, epoch, public, dealer.signing.sign(pub._message(config)))
    packages = {cid: _seal(config, secret, pub, cid, recipient, dealer) for cid, recipient in recipients.items()}
    return Deal(pub, packages)


def _seal(config: CKKSConfig, secret: bytes, pub: PublicContext, client_id: int, recipient: bytes, dealer: DealerKey) -> bytes:
    if len(recipient) != 32:
        raise ValueError(f"client {client_id}: an X25519 public key is 32 bytes, got {len(recipient)}")
    eph = X25519PrivateKey.generate()
    eph_pub = _raw(eph.public_key())
    shared = eph.exchange(X25519PublicKey.from_public_bytes(recipient))
    key = _package_key(shared, pub.key_id, eph_pub, recipient, client_id, pub.epoch)
    nonce = os.urandom(12)
    header = {
        "client_id": client_id,
        "epoch": pub.epoch,
        "key_id": pub.key_id.hex(),
        "params": _params(config),
        "ephemeral": eph_pub.hex(),
        "recipient": recipient.hex(),
        "nonce": nonce.hex(),
        "public_context_sha256": hashlib.sha256(pub.context).hexdigest(),
    }
    aad = DOMAIN_PACKAGE + _canonical(header)
    sealed = AESGCM(key).encrypt(nonce, secret, aad)
    signature = dealer.signing.sign(aad + hashlib.sha256(sealed).digest())
    tensors = {
        "sealed": wire.as_blob(sealed),
        "public_context": wire.as_blob(pub.context),
        "public_signature": wire.as_blob(pub.signature),
        "signature": wire.as_blob(signature),
    }
    return wire.encode(wire.Frame(PACKAGE, header, tensors))


@dataclass(frozen=True)
class ClientKey:
    """A client's opened key for one epoch: the secret context and what identifies it."""

    key_id: bytes
    epoch: int
    context: ts.Context
    check_key: bytes
    """HKDF of the secret context bytes: the key of the aggregate check and of the flooding noise
    (:mod:`.masking`); every client of the epoch derives the same one, the server cannot."""


def _hex(value: str, n: int, name: str) -> bytes:
    try:
        raw = bytes.fromhex(value)
    except ValueError as exc:
        raise wire.WireError(f"{name} is not hex") from exc
    if len(raw) != n:
        raise wire.WireError(f"{name} must be {n} bytes, got {len(raw)}")
    return raw


def open_package(data: bytes, me: ClientKeyPair, dealer_verify: bytes, config: CKKSConfig, *, epoch: int | None = None) -> ClientKey:
    """Authenticate and decrypt a key package addressed to ``me``; raise :class:`KeyPackageError`."""
    try:
        frame = wire.decode(data, expect=PACKAGE, max_bytes=MAX_PACKAGE_BYTES)
        client_id = frame.field("client_id", int)
        got_epoch = frame.field("epoch", int)
        key_id = _hex(frame.field("key_id", str), KEY_ID_BYTES, "key_id")
        params = frame.field("params", dict)
        eph_pub = _hex(frame.field("ephemeral", str), 32, "ephemeral")
        recipient = _hex(frame.field("recipient", str), 32, "recipient")
        nonce = _hex(frame.field("nonce", str), 12, "nonce")
        pc_hash = _hex(frame.field("public_context_sha256", str), 32, "public_context_sha256")
        sealed = frame.blob("sealed", max_bytes=MAX_SECRET_CONTEXT_BYTES + 16)
        public_context = frame.blob("public_context", max_bytes=MAX_PUBLIC_CONTEXT_BYTES)
        public_signature = frame.blob("public_signature", exact=64)
        signature = frame.blob("signature", exact=64)
    except wire.WireError as exc:
        raise KeyPackageError(f"key package: {exc}") from exc
    header = dict(frame.header)
    aad = DOMAIN_PACKAGE + _canonical(header)
    try:
        Ed25519PublicKey.from_public_bytes(dealer_verify).verify(signature, aad + hashlib.sha256(sealed).digest())
    except InvalidSignature as exc:
        raise KeyPackageError("key package is not signed by the pinned dealer key") from exc
    if client_id != me.client_id or recipient != me.public_bytes:
        raise KeyPackageError(f"key package is addressed to client {client_id}, not to client {me.client_id}")
    if epoch is not None and got_epoch != epoch:
        raise KeyPackageError(f"key package is for key epoch {got_epoch}, expected {epoch}")
    if params != _params(config):
        raise KeyPackageError(f"key package is for parameters {params}, this run uses {_params(config)}")
    if hashlib.sha256(public_context).digest() != pc_hash:
        raise KeyPackageError("key package's public context does not match its signed hash")
    pub = PublicContext(key_id, got_epoch, public_context, public_signature)
    try:
        Ed25519PublicKey.from_public_bytes(dealer_verify).verify(public_signature, pub._message(config))
    except InvalidSignature as exc:
        raise KeyPackageError("key package's public context is not signed by the pinned dealer key") from exc
    shared = me.private.exchange(X25519PublicKey.from_public_bytes(eph_pub))
    key = _package_key(shared, key_id, eph_pub, me.public_bytes, me.client_id, got_epoch)
    try:
        secret = AESGCM(key).decrypt(nonce, sealed, aad)
    except InvalidTag as exc:
        raise KeyPackageError("key package does not decrypt under this client's key") from exc
    try:
        ctx = load_context(secret, config, secret=True)
    except ValueError as exc:
        raise KeyPackageError(f"key package: {exc}") from exc
    return ClientKey(key_id, got_epoch, ctx, check_key(secret, key_id))
