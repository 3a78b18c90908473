"""``fedrlhf keys``: offline CKKS key setup (the dealer) and client key pairs.

The workflow a deployment follows (see docs/ckks.md)::

    fedrlhf keys client --id 3 --out client3/          # on client 3: X25519 key pair; send client-3.pub
    fedrlhf keys dealer --out dealer/                  # on the dealer: Ed25519 key; publish dealer.pub
    fedrlhf keys deal --dealer-key dealer/dealer.key --clients pubs/ --out deal/ [--config run.yaml]
        # -> deal/public-context.frame (to the server), deal/package-client-<id>.frame (to each client)
    fedrlhf keys open --package deal/package-client-3.frame --client-key client3/client-3.key \\
        --dealer-pub dealer/dealer.pub                 # on client 3: authenticate + decrypt its key

Key files are small JSON documents with hex keys; private ones are written with mode 0600.
Nothing here is ever unpickled; packages and public contexts are :mod:`aggregation.wire` frames.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .ckks.keys import ClientKeyPair, DealerKey, PublicContext, deal, open_package
from .ckks.params import CKKSConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    p = sub.add_parser("client", help="make a client's X25519 key pair (run on the client)")
    p.add_argument("--id", type=int, required=True, help="the client id")
    p.add_argument("--out", type=Path, required=True, help="directory for client-<id>.key and client-<id>.pub")
    p = sub.add_parser("dealer", help="make the dealer's Ed25519 signing key")
    p.add_argument("--out", type=Path, required=True, help="directory for dealer.key and dealer.pub")
    p = sub.add_parser("deal", help="make a CKKS key and seal it to every client's public key")
    p.add_argument("--dealer-key", type=Path, required=True, help="dealer.key from 'fedrlhf keys dealer'")
    p.add_argument("--clients", type=Path, required=True, help="directory holding the clients' client-<id>.pub files")
    p.add_argument("--out", type=Path, required=True, help="directory for public-context.frame and package-client-<id>.frame")
    p.add_argument("--epoch", type=int, default=0, help="key epoch (0 per run; the round index with rotate_keys: round)")
    _config_args(p)
    p = sub.add_parser("open", help="authenticate and decrypt a client's key package (run on the client)")
    p.add_argument("--package", type=Path, required=True)
    p.add_argument("--client-key", type=Path, required=True)
    p.add_argument("--dealer-pub", type=Path, required=True)
    p.add_argument("--epoch", type=int, default=None, help="expected key epoch")
    _config_args(p)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="run config whose aggregation section (kind: ckks) sets the parameters")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. aggregation.scale_bits=36")


def ckks_config(config_path: Path | None, overrides: list[str]) -> CKKSConfig:
    """The CKKS parameters from a run config (or the defaults), with ``--set aggregation.*`` overrides."""
    from fedrlhf_secure.configtypes import ConfigError, from_mapping
    from fedrlhf_secure.config import load_config, parse_overrides

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


def _write(path: Path, doc: dict[str, Any], private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh, indent=2)
        fh.write("\n")


def _read(path: Path, kind: str) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable key file ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("kind") != kind or not isinstance(doc.get("key"), str):
        raise ValueError(f"{path}: expected a {kind!r} key file")
    try:
        doc["key"] = bytes.fromhex(doc["key"])
    except ValueError as exc:
        raise ValueError(f"{path}: field 'key' is not hex") from exc
    if len(doc["key"]) != 32:
        raise ValueError(f"{path}: field 'key' must be 32 bytes")
    return doc


def load_client_key(path: Path) -> ClientKeyPair:
    doc = _read(path, "fedrlhf/x25519-private")
    if not isinstance(doc.get("client_id"), int):
        raise ValueError(f"{path}: field 'client_id' must be an integer")
    return ClientKeyPair.from_bytes(doc["client_id"], doc["key"])


def load_client_public(path: Path) -> tuple[int, bytes]:
    doc = _read(path, "fedrlhf/x25519-public")
    if not isinstance(doc.get("client_id"), int):
        raise ValueError(f"{path}: field 'client_id' must be an integer")
    return doc["client_id"], doc["key"]


def load_dealer_pub(path: Path) -> bytes:
    return _read(path, "fedrlhf/ed25519-public")["key"]


def run(args: argparse.Namespace) -> int:
    """Exit 0 on success, 1 when a key file or package is rejected (the message says why)."""
    from fedrlhf_secure.configtypes import ConfigError

    try:
        return _run(args)
    except ConfigError:
        raise
    except ValueError as exc:
        print(f"fedrlhf keys {args.keys_command}: error: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    cmd = args.keys_command
    if cmd == "client":
        kp = ClientKeyPair.generate(args.id)
        _write(args.out / f"client-{args.id}.key", {"kind": "fedrlhf/x25519-private", "client_id": args.id, "key": kp.private_bytes.hex()}, True)
        _write(args.out / f"client-{args.id}.pub", {"kind": "fedrlhf/x25519-public", "client_id": args.id, "key": kp.public_bytes.hex()}, False)
        print(f"client {args.id}: keep {args.out / f'client-{args.id}.key'} private; send {args.out / f'client-{args.id}.pub'} to the dealer")
        return 0
    if cmd == "dealer":
        dk = DealerKey.generate()
        _write(args.out / "dealer.key", {"kind": "fedrlhf/ed25519-private", "key": dk.private_bytes.hex()}, True)
        _write(args.out / "dealer.pub", {"kind": "fedrlhf/ed25519-public", "key": dk.verify_bytes.hex()}, False)
        print(f"dealer: keep {args.out / 'dealer.key'} private; give {args.out / 'dealer.pub'} to every client and the server")
        return 0
    config = ckks_config(args.config, args.overrides)
    if cmd == "deal":
        dealer = DealerKey.from_bytes(_read(args.dealer_key, "fedrlhf/ed25519-private")["key"])
        recipients: dict[int, bytes] = {}
        for path in sorted(args.clients.glob("client-*.pub")):
            cid, pub = load_client_public(path)
            if cid in recipients:
                raise ValueError(f"{path}: client {cid} appears twice in {args.clients}")
            recipients[cid] = pub
        if not recipients:
            raise FileNotFoundError(f"no client-<id>.pub files in {args.clients}")
        dealt = deal(config, recipients, dealer, args.epoch)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "public-context.frame").write_bytes(dealt.public.encode(config))
        for cid, package in dealt.packages.items():
            fd = os.open(args.out / f"package-client-{cid}.frame", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(package)
        print(
            f"dealt CKKS key {dealt.public.key_id.hex()} (epoch {args.epoch}, N={config.poly_modulus_degree}, "
            f"primes {list(config.coeff_mod_bit_sizes)}, scale 2^{config.scale_bits}) to {len(recipients)} clients: "
            f"{args.out / 'public-context.frame'} for the server, package-client-<id>.frame for each client"
        )
        return 0
    if cmd == "open":
        me = load_client_key(args.client_key)
        key = open_package(args.package.read_bytes(), me, load_dealer_pub(args.dealer_pub), config, epoch=args.epoch)
        print(f"client {me.client_id}: key package verified; CKKS key {key.key_id.hex()} epoch {key.epoch}")
        return 0
    raise ValueError(f"unknown keys action {cmd!r}")


def load_public_context(path: Path, dealer_pub: Path, config: CKKSConfig) -> PublicContext:
    """The server's side of ``deal``'s output: the signed public context, authenticated."""
    return PublicContext.decode(path.read_bytes(), config, load_dealer_pub(dealer_pub))


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
        pub = PublicContext.decode((self.deal_dir / "public-context.frame").read_bytes(), self.config, self.dealer_verify)
        if pub.epoch != epoch:
            raise ValueError(f"{self.deal_dir}: the dealt key is for epoch {pub.epoch}, round needs epoch {epoch}")
        return pub

    def client_key(self, client_id: int, epoch: int):
        if self.me is None or self.me.client_id != client_id:
            raise ValueError(f"this process holds no key file for client {client_id}")
        package = (self.deal_dir / f"package-client-{client_id}.frame").read_bytes()
        return open_package(package, self.me, self.dealer_verify, self.config, epoch=epoch)
