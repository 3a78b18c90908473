"""Signed Flower app packages: a SuperNode runs only the app bundle its operator's key signed.

Why: whoever can ``flwr run`` on the SuperLink ships a Flower app bundle (FAB) that every SuperNode
installs and executes next to its data and its client host (issue 12, item 5). Flower 1.42's answer
is ``flower-supernode --trusted-entities FILE``: a YAML map ``{key_id: "ssh-ed25519 ..."}``, and a
FAB runs only with an Ed25519 signature by one of those keys over ``signed_at (8 bytes, big-endian)
|| SHA-256(FAB)`` (``flwr.supercore.primitives.asymmetric_ed25519.create_message_to_sign``). But in
flwr 1.42 those signatures reach a SuperNode only inside the FAB's ``verifications``, which the
SuperLink fills in only for apps fetched from Flower Hub (``control_handlers._get_remote_fab``); a
FAB submitted with ``flwr run`` always has empty verifications, so a SuperNode with
``--trusted-entities`` refuses every locally submitted app ("App verification is not supported by
the connected SuperLink"), signed or not.

So the same check is made one step later, by the process that would execute the app: the node's
``flwr-clientapp`` is :mod:`.verified_clientapp`, which verifies the FAB it pulled before Flower
installs or imports it. The signature travels in the run config (``app-signature``, set by the
operator with ``flwr run --run-config``); the SuperLink cannot forge it, and the FAB it covers is
the exact bytes the node received. The node's trusted keys are a file in Flower's own
``--trusted-entities`` format, named by the SuperNode's node config (``app-signers``), which the
server cannot change. The same file works with ``--trusted-entities`` once apps come from Flower Hub.

Signatures use ``cryptography``'s Ed25519, keys are OpenSSH files as ``flwr`` expects them.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Mapping
from pathlib import Path

import yaml
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import InputError, RunFailed
from .credentials import CredentialExists, NodeKeyPaths, _write

SIGNATURE_FIELD = "app-signature"
"""Run-config key carrying ``<key id>:<signed_at>:<base64url signature>``."""
SIGNERS_FIELD = "app-signers"
"""Node-config key naming the node's trusted-entities file (Flower's ``--trusted-entities`` format)."""
MAX_KEY_ID = 64


class AppRefused(RunFailed):
    """A Flower app bundle without a valid signature by one of the node's trusted keys."""


def message_to_sign(fab: bytes, signed_at: int) -> bytes:
    """Flower's canonical signed message: ``signed_at`` (8 bytes, big-endian) || SHA-256(FAB)."""
    return int(signed_at).to_bytes(8, "big") + hashlib.sha256(fab).digest()


def build_fab(app_dir: Path) -> bytes:
    """The FAB ``flwr run APP_DIR`` submits (flwr's own builder; deterministic for the same files)."""
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(Path(app_dir))


def create_signing_key(out_dir: Path, name: str = "app-signer") -> NodeKeyPaths:
    """An Ed25519 app-signing key pair in OpenSSH format: ``NAME`` (private, 0600) and ``NAME.pub``."""
    if not name or "/" in name or name.startswith(".") or len(name) > MAX_KEY_ID:
        raise InputError(f"invalid signing key name {name!r}: use a plain file name of at most {MAX_KEY_ID} characters")
    paths = NodeKeyPaths(Path(out_dir) / name, Path(out_dir) / f"{name}.pub")
    if paths.private_key.exists():
        raise CredentialExists(f"{paths.private_key} already exists; refusing to overwrite an app-signing key")
    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(paths.private_key, priv, private=True)
    _write(paths.public_key, pub + f" {name}\n".encode(), private=False)
    return paths


def sign_fab(fab: bytes, private_key: Path, key_id: str, *, signed_at: int | None = None) -> str:
    """The ``app-signature`` run-config value for ``fab``: ``<key id>:<signed_at>:<base64url signature>``."""
    key = serialization.load_ssh_private_key(Path(private_key).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise InputError(f"{private_key}: an app-signing key must be Ed25519")
    if not key_id or ":" in key_id or len(key_id) > MAX_KEY_ID:
        raise InputError(f"invalid key id {key_id!r}: 1..{MAX_KEY_ID} characters without ':'")
    at = int(time.time()) if signed_at is None else int(signed_at)
    sig = key.sign(message_to_sign(fab, at))
    return f"{key_id}:{at}:{base64.urlsafe_b64encode(sig).rstrip(b'=').decode('ascii')}"


def write_trusted_entities(path: Path, keys: Mapping[str, Path]) -> Path:
    """A trusted-entities file in Flower's format: ``{key_id: "ssh-ed25519 AAAA... comment"}``."""
    entries = {}
    for key_id, pub in keys.items():
        text = Path(pub).read_text(encoding="utf-8").strip()
        _ed25519_public(text, f"{pub}")
        entries[str(key_id)] = text
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(entries, sort_keys=True, width=4096), encoding="utf-8")
    return path


def _ed25519_public(text: str, where: str) -> Ed25519PublicKey:
    try:
        key = serialization.load_ssh_public_key(text.encode("utf-8"))
    except (ValueError, TypeError) as exc:
        raise InputError(f"{where}: not an OpenSSH public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise InputError(f"{where}: a trusted app signer must be an Ed25519 key (ssh-ed25519)")
    return key


def load_trusted_entities(path: Path) -> dict[str, Ed25519PublicKey]:
    """The node's trusted app signers; a missing, empty or malformed file is an :class:`InputError`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"trusted app signers file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict) or not raw:
        raise InputError(f"{path}: expected a mapping of key ids to ssh-ed25519 public keys")
    return {str(k): _ed25519_public(str(v), f"{path}: {k}") for k, v in raw.items()}


def verify_fab(fab: bytes, signature: object, trusted: Mapping[str, Ed25519PublicKey]) -> str:
    """Return the key id whose valid signature covers ``fab``, or raise :class:`AppRefused`."""
    if not isinstance(signature, str) or not signature:
        raise AppRefused("the app bundle carries no signature (run config 'app-signature' is empty); refusing to run it")
    parts = signature.split(":")
    if len(parts) != 3 or not parts[1].isascii() or not parts[1].isdigit() or len(parts[1]) > 19 or len(parts[2]) > 200:
        raise AppRefused("the app signature is malformed (expected '<key id>:<signed_at>:<base64url signature>')")
    key_id, at, sig_b64 = parts
    if key_id not in trusted:
        raise AppRefused(f"the app is signed by {key_id[:MAX_KEY_ID]!r}, which is not one of this node's trusted signers {sorted(trusted)}")
    try:
        sig = base64.urlsafe_b64decode(sig_b64 + "=" * (-len(sig_b64) % 4))
        trusted[key_id].verify(sig, message_to_sign(fab, int(at)))
    except (InvalidSignature, ValueError) as exc:
        raise AppRefused(
            f"the app signature by {key_id!r} does not verify over this bundle (sha256 {hashlib.sha256(fab).hexdigest()[:16]}…)"
        ) from exc
    return key_id
