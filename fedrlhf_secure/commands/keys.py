"""``fedrlhf keys``: offline CKKS key setup (the dealer), client key pairs, and SecAgg identities.

The files and the ceremony are :mod:`fedrlhf_secure.keys`; this module only parses the command
line and prints where each file went (the workflow is in that module's docstring and docs/ckks.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import add_overrides


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
    p.add_argument("--package", type=Path, required=True, help="package-client-<id>.frame from 'fedrlhf keys deal'")
    p.add_argument("--client-key", type=Path, required=True, help="this client's client-<id>.key")
    p.add_argument("--dealer-pub", type=Path, required=True, help="the pinned dealer.pub")
    p.add_argument("--epoch", type=int, default=None, help="expected key epoch")
    _config_args(p)
    p = sub.add_parser("secagg-identity", help="make a client's Ed25519 SecAgg identity (run on the client)")
    p.add_argument("--id", type=int, required=True, help="the client id")
    p.add_argument("--out", type=Path, required=True, help="directory for secagg-identity-<id>.key and .pub")
    p = sub.add_parser("secagg-registry", help="collect every client's SecAgg identity into secagg-registry.json")
    p.add_argument("--pubs", type=Path, required=True, help="directory holding the secagg-identity-<id>.pub files")
    p.add_argument("--out", type=Path, required=True, help="directory for secagg-registry.json (give it to the server and every node)")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="run config whose aggregation section (kind: ckks) sets the parameters")
    add_overrides(p, example="aggregation.scale_bits=36")


def run(args: argparse.Namespace) -> int:
    """Exit 0; a rejected key file or package raises (the CLI maps it: 2 bad file, 1 refused package)."""
    from .. import keys

    cmd = args.keys_command
    if cmd == "client":
        files = keys.make_client_keys(args.id, args.out)
        print(f"client {args.id}: keep {files.private} private; send {files.public} to the dealer")
        return 0
    if cmd == "dealer":
        files = keys.make_dealer_key(args.out)
        print(f"dealer: keep {files.private} private; give {files.public} to every client and the server")
        return 0
    if cmd == "secagg-identity":
        private, public = keys.make_secagg_identity(args.id, args.out)
        print(f"client {args.id}: keep {private} private (in its node's keys directory); send {public} to the operator")
        return 0
    if cmd == "secagg-registry":
        path = keys.make_secagg_registry(args.pubs, args.out)
        print(f"wrote {path}: put it in the server's and every node's keys directory before round 0")
        return 0
    config = keys.ckks_config(args.config, args.overrides)
    if cmd == "deal":
        dealt = keys.deal_to_directory(args.dealer_key, args.clients, args.out, config, args.epoch)
        print(
            f"dealt CKKS key {dealt.public.key_id.hex()} (epoch {args.epoch}, N={config.poly_modulus_degree}, "
            f"primes {list(config.coeff_mod_bit_sizes)}, scale 2^{config.scale_bits}) to {len(dealt.packages)} clients: "
            f"{dealt.public_context} for the server, package-client-<id>.frame for each client"
        )
        return 0
    if cmd == "open":
        client_id, key = keys.open_package_file(args.package, args.client_key, args.dealer_pub, config, epoch=args.epoch)
        print(f"client {client_id}: key package verified; CKKS key {key.key_id.hex()} epoch {key.epoch}")
        return 0
    raise AssertionError(cmd)
