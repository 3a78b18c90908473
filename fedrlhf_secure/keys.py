"""Key files of the CKKS key ceremony: the one module that reads and writes a key directory.

The cryptography (X25519 client key pairs, the Ed25519 dealer key, sealed key packages, the signed
public context) lives in :mod:`aggregation.ckks.keys` and knows nothing of files or run configs;
this module puts it on disk and takes the CKKS parameters from a run config. ``fedrlhf keys``
(:mod:`fedrlhf_secure.commands.keys`) and deployments (:func:`deal_run_keys`) both call it.

The workflow a deployment follows (see docs/ckks.md)::

    fedrlhf keys client --id 3 --out client3/          # on client 3: X25519 key pair; send client-3.pub
    fedrlhf keys dealer --out dealer/                  # on the dealer: Ed25519 key; publish dealer.pub
    fedrlhf keys deal --dealer-key dealer/dealer.key --clients pubs/ --out deal/ [--config run.yaml]
        # -> deal/public-context.frame (to the server), deal/package-client-<id>.frame (to each client)
    fedrlhf keys open --package deal/package-client-3.frame --client-key client3/client-3.key \\
        --dealer-pub dealer/dealer.pub                 # on client 3: authenticate + decrypt its key

SecAgg identities (``aggregation.kind: secagg``; docs/masking.md). Every client signs its per-round
keys and the survivor set with a long-term Ed25519 identity, and every party must know every
client's public identity before round 0, from a registry the operator distributes like
``dealer.pub``::

    fedrlhf keys secagg-identity --id 3 --out client3/  # on client 3: secagg-identity-3.key (0600) + .pub
    fedrlhf keys secagg-registry --pubs pubs/ --out registry/
        # -> registry/secagg-registry.json: every client's public identity; give it to the server
        #    and every node (its keys directory), pinned like dealer.pub

Key files are small JSON documents with hex keys; private ones are written with mode 0600.
Nothing here is ever unpickled; packages and public contexts are :mod:`aggregation.wire` frames.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputError

if TYPE_CHECKING:  # tenseal is heavy: imported when a key is made or opened, not with this module
    from aggregation.ckks.keys import ClientKey, ClientKeyPair, PublicContext
    from aggregation.ckks.params import CKKSConfig

CLIENT_PRIVATE = "fedrlhf/x25519-private"
CLIENT_PUBLIC = "fedrlhf/x25519-public"
DEALER_PRIVATE = "fedrlhf/ed25519-private"
DEALER_PUBLIC = "fedrlhf/ed25519-public"
PUBLIC_CONTEXT = "public-context.frame"
IDENTITY_PRIVATE = "fedrlhf/secagg-identity-ed25519-private"
IDENTITY_PUBLIC = "fedrlhf/secagg-identity-ed25519-public"
REGISTRY_KIND = "fedrlhf/secagg-identity-registry"
REGISTRY = "secagg-registry.json"
MAX_REGISTRY_BYTES = 1 << 24


class KeyFileError(InputError, FileNotFoundError):
    """A key file is missing, unreadable, of the wrong kind or for another client or epoch; the
    message names it (bad input: exit status 2)."""


def ckks_config(config_path: Path | None, overrides: Sequence[str] = ()) -> CKKSConfig:
    """The CKKS parameters from a run config (or the defaults), with ``--set aggregation.*`` overrides."""
    from aggregation.ckks.params import CKKSConfig

    from .config import load_config, parse_overrides
    from .configtypes import ConfigError, from_mapping

    if config_path is not None:
        section = load_config(config_path, overrides).aggregation
        if section.kind != "ckks":
            raise ConfigError(f"aggregation.kind is {section.kind!r}; CKKS keys need kind: ckks", source=str(config_path))
        return section.params
    raw: dict[str, Any] = {}
    for path, value in parse_overrides(overrides):
        if len(path) != 2 or path[0] != "aggregation":
            raise ConfigError(f"--set {'.'.join(path)}: without --config only aggregation.<key> can be set")
        if path[1] != "kind":
            raw[path[1]] = value
    return from_mapping(CKKSConfig, raw, key="aggregation", source="--set")


def write_key_file(path: Path, doc: dict[str, Any], private: bool) -> None:
    """Write a JSON key document; a private one is created with mode 0600 (never readable by others)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh, indent=2)
        fh.write("\n")


def _write_private_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def read_key_file(path: Path, kind: str) -> dict[str, Any]:
    """A key document of ``kind`` with its 32-byte ``key`` decoded, or :class:`KeyFileError`."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise KeyFileError(f"{path}: not a readable key file ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("kind") != kind or not isinstance(doc.get("key"), str):
        raise KeyFileError(f"{path}: expected a {kind!r} key file")
    try:
        doc["key"] = bytes.fromhex(doc["key"])
    except ValueError as exc:
        raise KeyFileError(f"{path}: field 'key' is not hex") from exc
    if len(doc["key"]) != 32:
        raise KeyFileError(f"{path}: field 'key' must be 32 bytes")
    return doc


def require(path: Path) -> Path:
    """``path`` if it is a file, else :class:`KeyFileError` saying where it comes from."""
    if not Path(path).is_file():
        raise KeyFileError(f"missing key file {path} (made by `fedrlhf keys`; see docs/deployment.md)")
    return Path(path)


def load_client_key(path: Path) -> ClientKeyPair:
    from aggregation.ckks.keys import ClientKeyPair

    doc = read_key_file(path, CLIENT_PRIVATE)
    if not isinstance(doc.get("client_id"), int):
        raise KeyFileError(f"{path}: field 'client_id' must be an integer")
    return ClientKeyPair.from_bytes(doc["client_id"], doc["key"])


def load_client_public(path: Path) -> tuple[int, bytes]:
    doc = read_key_file(path, CLIENT_PUBLIC)
    if not isinstance(doc.get("client_id"), int):
        raise KeyFileError(f"{path}: field 'client_id' must be an integer")
    return doc["client_id"], doc["key"]


def load_dealer_pub(path: Path) -> bytes:
    return read_key_file(path, DEALER_PUBLIC)["key"]


def load_public_context(path: Path, dealer_pub: Path, config: CKKSConfig) -> PublicContext:
    """The server's side of ``deal``'s output: the signed public context, authenticated."""
    from aggregation.ckks.keys import PublicContext

    return PublicContext.decode(Path(path).read_bytes(), config, load_dealer_pub(dealer_pub))


@dataclass(frozen=True)
class ClientKeyFiles:
    private: Path
    public: Path


def make_client_keys(client_id: int, out: Path) -> ClientKeyFiles:
    """A client's X25519 key pair: ``client-<id>.key`` (0600, stays on the client) and ``.pub``."""
    from aggregation.ckks.keys import ClientKeyPair

    kp = ClientKeyPair.generate(client_id)
    files = ClientKeyFiles(Path(out) / f"client-{client_id}.key", Path(out) / f"client-{client_id}.pub")
    write_key_file(files.private, {"kind": CLIENT_PRIVATE, "client_id": client_id, "key": kp.private_bytes.hex()}, True)
    write_key_file(files.public, {"kind": CLIENT_PUBLIC, "client_id": client_id, "key": kp.public_bytes.hex()}, False)
    return files


@dataclass(frozen=True)
class DealerKeyFiles:
    private: Path
    public: Path


def make_dealer_key(out: Path) -> DealerKeyFiles:
    """The dealer's Ed25519 signing key: ``dealer.key`` (0600) and ``dealer.pub`` (for everyone)."""
    from aggregation.ckks.keys import DealerKey

    dk = DealerKey.generate()
    files = DealerKeyFiles(Path(out) / "dealer.key", Path(out) / "dealer.pub")
    write_key_file(files.private, {"kind": DEALER_PRIVATE, "key": dk.private_bytes.hex()}, True)
    write_key_file(files.public, {"kind": DEALER_PUBLIC, "key": dk.verify_bytes.hex()}, False)
    return files


@dataclass(frozen=True)
class DealtFiles:
    public: PublicContext
    public_context: Path
    packages: dict[int, Path]


def deal_to_directory(dealer_key: Path, clients_dir: Path, out: Path, config: CKKSConfig, epoch: int = 0) -> DealtFiles:
    """Make a CKKS key and seal it to each ``client-<id>.pub`` in ``clients_dir``; write
    ``out/public-context.frame`` (for the server) and ``out/package-client-<id>.frame`` (0600)."""
    from aggregation.ckks.keys import DealerKey, deal

    dealer = DealerKey.from_bytes(read_key_file(dealer_key, DEALER_PRIVATE)["key"])
    recipients: dict[int, bytes] = {}
    for path in sorted(Path(clients_dir).glob("client-*.pub")):
        cid, pub = load_client_public(path)
        if cid in recipients:
            raise KeyFileError(f"{path}: client {cid} appears twice in {clients_dir}")
        recipients[cid] = pub
    if not recipients:
        raise KeyFileError(f"no client-<id>.pub files in {clients_dir}")
    dealt = deal(config, recipients, dealer, epoch)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / PUBLIC_CONTEXT).write_bytes(dealt.public.encode(config))
    packages = {}
    for cid, package in dealt.packages.items():
        packages[cid] = out / f"package-client-{cid}.frame"
        _write_private_bytes(packages[cid], package)
    return DealtFiles(dealt.public, out / PUBLIC_CONTEXT, packages)


def open_package_file(
    package: Path, client_key: Path, dealer_pub: Path, config: CKKSConfig, epoch: int | None = None
) -> tuple[int, ClientKey]:
    """Authenticate and decrypt a client's key package with its key file and the pinned dealer key:
    ``(client id, opened key)``; a package for someone else or forged raises ``KeyPackageError``."""
    from aggregation.ckks.keys import open_package

    me = load_client_key(client_key)
    return me.client_id, open_package(require(package).read_bytes(), me, load_dealer_pub(dealer_pub), config, epoch=epoch)


class DealtKeyFiles:
    """A :class:`aggregation.ckks.protocol.KeySource` over ``fedrlhf keys deal`` output, for deployments.

    The server process builds it with ``client_keys=None`` and only ever reads the signed public
    context; a client process passes its own key file and reads only its own package. Only epoch
    ``epoch`` exists (``rotate_keys: run``; deal again with ``--epoch`` for a new key).
    """

    def __init__(self, config: CKKSConfig, deal_dir: Path, dealer_pub: Path, client_key: Path | None = None) -> None:
        self.config = config
        self.deal_dir = Path(deal_dir)
        self.dealer_verify = load_dealer_pub(Path(dealer_pub))
        self.me = load_client_key(Path(client_key)) if client_key is not None else None

    def public(self, epoch: int) -> PublicContext:
        from aggregation.ckks.keys import PublicContext

        pub = PublicContext.decode((self.deal_dir / PUBLIC_CONTEXT).read_bytes(), self.config, self.dealer_verify)
        if pub.epoch != epoch:
            raise KeyFileError(f"{self.deal_dir}: the dealt key is for epoch {pub.epoch}, round needs epoch {epoch}")
        return pub

    def client_key(self, client_id: int, epoch: int) -> ClientKey:
        from aggregation.ckks.keys import open_package

        if self.me is None or self.me.client_id != client_id:
            raise KeyFileError(f"this process holds no key file for client {client_id}")
        package = (self.deal_dir / f"package-client-{client_id}.frame").read_bytes()
        return open_package(package, self.me, self.dealer_verify, self.config, epoch=epoch)


def identity_files(out: Path, client_id: int) -> tuple[Path, Path]:
    return Path(out) / f"secagg-identity-{client_id}.key", Path(out) / f"secagg-identity-{client_id}.pub"


def make_secagg_identity(client_id: int, out: Path) -> tuple[Path, Path]:
    """A client's Ed25519 SecAgg identity: ``secagg-identity-<id>.key`` (0600, stays on the client) and ``.pub``."""
    from aggregation.secagg.crypto import Identities, public_raw

    ids = Identities.generate([client_id])
    sk = ids.private[client_id]
    from cryptography.hazmat.primitives import serialization

    raw = sk.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    private, public = identity_files(out, client_id)
    write_key_file(private, {"kind": IDENTITY_PRIVATE, "client_id": client_id, "key": raw.hex()}, True)
    write_key_file(public, {"kind": IDENTITY_PUBLIC, "client_id": client_id, "key": public_raw(ids.public[client_id]).hex()}, False)
    return private, public


def make_secagg_registry(pubs_dir: Path, out: Path) -> Path:
    """``out/secagg-registry.json``: every ``secagg-identity-<id>.pub`` in ``pubs_dir`` (each client once)."""
    clients: dict[int, str] = {}
    for path in sorted(Path(pubs_dir).glob("secagg-identity-*.pub")):
        doc = read_key_file(path, IDENTITY_PUBLIC)
        cid = doc.get("client_id")
        if not isinstance(cid, int) or isinstance(cid, bool):
            raise KeyFileError(f"{path}: field 'client_id' must be an integer")
        if cid in clients:
            raise KeyFileError(f"{path}: client {cid} appears twice in {pubs_dir}")
        clients[cid] = doc["key"].hex()
    if not clients:
        raise KeyFileError(f"no secagg-identity-<id>.pub files in {pubs_dir}")
    path = Path(out) / REGISTRY
    write_key_file(path, {"kind": REGISTRY_KIND, "clients": {str(c): k for c, k in sorted(clients.items())}}, False)
    return path


def load_secagg_identities(keys_dir: Path, client_ids: Sequence[int], hosted: Sequence[int] = ()):
    """The run's :class:`aggregation.secagg.crypto.Identities` from a key directory: the registry's
    public key of every client of the run, and the private key of each ``hosted`` client (checked
    against the registry, so a node cannot sign as anyone else)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    from aggregation.secagg.crypto import Identities, public_raw

    path = require(Path(keys_dir) / REGISTRY)
    if path.stat().st_size > MAX_REGISTRY_BYTES:
        raise KeyFileError(f"{path}: larger than {MAX_REGISTRY_BYTES} bytes")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, RecursionError) as exc:
        raise KeyFileError(f"{path}: not a readable registry ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("kind") != REGISTRY_KIND or not isinstance(doc.get("clients"), dict):
        raise KeyFileError(f"{path}: expected a {REGISTRY_KIND!r} file")
    ids = Identities()
    for cid in client_ids:
        hexkey = doc["clients"].get(str(cid))
        if not isinstance(hexkey, str):
            raise KeyFileError(f"{path}: client {cid} of this run has no registered identity")
        try:
            ids.public[cid] = Ed25519PublicKey.from_public_bytes(bytes.fromhex(hexkey))
        except ValueError as exc:
            raise KeyFileError(f"{path}: identity of client {cid} is not a 32-byte hex Ed25519 key") from exc
    for cid in hosted:
        key_path = require(identity_files(keys_dir, cid)[0])
        kdoc = read_key_file(key_path, IDENTITY_PRIVATE)
        if kdoc.get("client_id") != cid:
            raise KeyFileError(f"{key_path} belongs to client {kdoc.get('client_id')}, not {cid}")
        sk = Ed25519PrivateKey.from_private_bytes(kdoc["key"])
        if public_raw(sk.public_key()) != public_raw(ids.public[cid]):
            raise KeyFileError(f"{key_path}: does not match client {cid}'s identity in {path}")
        ids.private[cid] = sk
    return ids


def deal_secagg_identities(node_clients: Sequence[Sequence[int]], server_dir: Path, node_dirs: Sequence[Path], registry_dir: Path) -> Path:
    """The SecAgg identity ceremony on one machine: identities made in each node's directory, the
    registry built from their public halves and copied to the server and every node."""
    pubs = Path(registry_dir) / "identity-pubs"
    pubs.mkdir(parents=True, exist_ok=True)
    for clients, node_dir in zip(node_clients, node_dirs, strict=True):
        for c in clients:
            _, public = make_secagg_identity(c, Path(node_dir))
            shutil.copy(public, pubs / public.name)
    registry = make_secagg_registry(pubs, Path(registry_dir))
    for d in [Path(server_dir), *map(Path, node_dirs)]:
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(registry, d / REGISTRY)
    return registry


def deal_run_keys(
    config_path: Path, node_clients: Sequence[Sequence[int]], server_dir: Path, node_dirs: Sequence[Path], dealer_dir: Path
) -> None:
    """The whole key ceremony on one machine (for ``fedrlhf deploy local`` and tests).

    Does what a multi-machine deployment does on each party (client key pairs on the nodes, the
    dealer key and the deal on the dealer), then copies each file to where its owner keeps it;
    only public keys and sealed packages move between parties. Both kinds get the SecAgg identities
    and registry (:func:`deal_secagg_identities`); ``kind: ckks`` also gets the CKKS deal.
    """
    from .config import load_config

    # SecAgg identities for kind secagg, and for ckks too: its mask round is a SecAgg+ round whose
    # survivor sets and keys are signed under the same registry (aggregation/ckks/masking.py)
    deal_secagg_identities(node_clients, server_dir, node_dirs, dealer_dir)
    if load_config(Path(config_path)).aggregation.kind == "secagg":
        return
    config = ckks_config(Path(config_path))
    pubs = Path(dealer_dir) / "client-pubs"
    pubs.mkdir(parents=True, exist_ok=True)
    for clients, node_dir in zip(node_clients, node_dirs, strict=True):
        for c in clients:
            files = make_client_keys(c, Path(node_dir))
            shutil.copy(files.public, pubs / files.public.name)
    dealer = make_dealer_key(Path(dealer_dir))
    dealt = deal_to_directory(dealer.private, pubs, Path(dealer_dir) / "deal", config)
    server_dir = Path(server_dir)
    server_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(dealt.public_context, server_dir / PUBLIC_CONTEXT)
    shutil.copy(dealer.public, server_dir / "dealer.pub")
    for clients, node_dir in zip(node_clients, node_dirs, strict=True):
        shutil.copy(dealer.public, Path(node_dir) / "dealer.pub")
        for c in clients:
            shutil.copy(dealt.packages[c], Path(node_dir) / dealt.packages[c].name)
