"""Building the aggregator on each side of a deployment, where keys come from files, not memory.

In process, ``aggregation: {kind: ckks}`` deals a fresh CKKS key through a simulated dealer held
by the same process. Across machines that would put the secret key next to the server, so here
the server and every node build the aggregator from the files of ``fedrlhf keys`` (the offline
dealer ceremony, docs/ckks.md):

* the server's key directory holds ``dealer.pub`` and ``public-context.frame`` (no key at all);
* a node's key directory holds ``dealer.pub`` and, for each client ``c`` it hosts,
  ``client-c.key`` (its X25519 key, made on the node) and ``package-client-c.frame``.

Every file is authenticated against the pinned dealer key before use. Plain and masking
aggregators need no key files (SecAgg keys are per round and made inside the client halves).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from aggregation.base import Aggregator

from ..config import RunConfig
from ..federation.engine import build_aggregator


class KeyFileError(FileNotFoundError):
    """A key file the aggregation mode needs is missing; the message names it."""


def _need(path: Path) -> Path:
    if not path.is_file():
        raise KeyFileError(f"missing key file {path} (made by `fedrlhf keys`; see docs/deployment.md)")
    return path


class ServerFileKeys:
    """The CKKS :class:`~aggregation.ckks.protocol.KeySource` of the server: the public context only."""

    def __init__(self, keys_dir: Path, config) -> None:
        from aggregation.ckks_keys import load_public_context

        self.public_context = load_public_context(
            _need(Path(keys_dir) / "public-context.frame"), _need(Path(keys_dir) / "dealer.pub"), config
        )

    def public(self, epoch: int):
        if epoch != self.public_context.epoch:
            raise KeyFileError(f"key epoch {epoch} requested, the key directory holds epoch {self.public_context.epoch}")
        return self.public_context

    def client_key(self, client_id: int, epoch: int):
        raise PermissionError("the server holds no client key")


class NodeFileKeys:
    """The CKKS key source of a node: the opened key package of each client it hosts."""

    def __init__(self, keys_dir: Path, config, client_ids: Sequence[int]) -> None:
        from aggregation.ckks.keys import open_package
        from aggregation.ckks_keys import load_client_key, load_dealer_pub

        keys_dir = Path(keys_dir)
        dealer = load_dealer_pub(_need(keys_dir / "dealer.pub"))
        self.keys = {}
        for c in client_ids:
            me = load_client_key(_need(keys_dir / f"client-{c}.key"))
            if me.client_id != c:
                raise ValueError(f"{keys_dir / f'client-{c}.key'} belongs to client {me.client_id}, not {c}")
            package = _need(keys_dir / f"package-client-{c}.frame").read_bytes()
            self.keys[c] = open_package(package, me, dealer, config, epoch=0)

    def public(self, epoch: int):
        raise PermissionError("a node does not run the server half")

    def client_key(self, client_id: int, epoch: int):
        if client_id not in self.keys:
            raise KeyFileError(f"no key package for client {client_id} on this node")
        key = self.keys[client_id]
        if key.epoch != epoch:
            raise KeyFileError(f"client {client_id}: key epoch {epoch} requested, its package is for epoch {key.epoch}")
        return key


def _check_ckks(config: RunConfig) -> None:
    if getattr(config.aggregation.params, "rotate_keys", "run") != "run":
        raise ValueError("aggregation.rotate_keys: round needs a key ceremony per round; deployments deal one key per run (rotate_keys: run)")


def server_aggregator(config: RunConfig, client_ids: Sequence[int], keys_dir: Path | None) -> Aggregator:
    if config.aggregation.kind != "ckks":
        return build_aggregator(config, list(client_ids))
    from aggregation.ckks import CKKSAggregator

    _check_ckks(config)
    if keys_dir is None:
        raise KeyFileError("aggregation.kind ckks over Flower needs the server's key directory (run config keys-dir)")
    return CKKSAggregator(config.aggregation.params, ServerFileKeys(keys_dir, config.aggregation.params))


def node_aggregator(config: RunConfig, client_ids: Sequence[int], hosted: Sequence[int], keys_dir: Path | None) -> Aggregator:
    if config.aggregation.kind != "ckks":
        return build_aggregator(config, list(client_ids))
    from aggregation.ckks import CKKSAggregator

    _check_ckks(config)
    if keys_dir is None:
        raise KeyFileError("aggregation.kind ckks needs this node's key directory (fedrlhf deploy client-host --keys-dir)")
    return CKKSAggregator(config.aggregation.params, NodeFileKeys(keys_dir, config.aggregation.params, hosted))


def deal_keys(config_path: Path, node_clients: Sequence[Sequence[int]], server_dir: Path, node_dirs: Sequence[Path], dealer_dir: Path) -> None:
    """The whole ``fedrlhf keys`` ceremony on one machine (for ``fedrlhf deploy local`` and tests).

    Runs the same commands a multi-machine deployment runs on each party (client key pairs on the
    nodes, the dealer key and the deal on the dealer), then copies each file to where its owner
    keeps it; only public keys and sealed packages move between parties.
    """
    import shutil

    from ..cli import main as fedrlhf

    pubs = dealer_dir / "client-pubs"
    for clients, node_dir in zip(node_clients, node_dirs):
        for c in clients:
            _ok(fedrlhf(["keys", "client", "--id", str(c), "--out", str(node_dir)]))
            pubs.mkdir(parents=True, exist_ok=True)
            shutil.copy(node_dir / f"client-{c}.pub", pubs / f"client-{c}.pub")
    _ok(fedrlhf(["keys", "dealer", "--out", str(dealer_dir)]))
    deal_dir = dealer_dir / "deal"
    _ok(fedrlhf(["keys", "deal", "--dealer-key", str(dealer_dir / "dealer.key"), "--clients", str(pubs), "--out", str(deal_dir), "--config", str(config_path)]))
    server_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(deal_dir / "public-context.frame", server_dir / "public-context.frame")
    shutil.copy(dealer_dir / "dealer.pub", server_dir / "dealer.pub")
    for clients, node_dir in zip(node_clients, node_dirs):
        shutil.copy(dealer_dir / "dealer.pub", node_dir / "dealer.pub")
        for c in clients:
            shutil.copy(deal_dir / f"package-client-{c}.frame", node_dir / f"package-client-{c}.frame")


def _ok(code: int) -> None:
    if code != 0:
        raise RuntimeError(f"fedrlhf keys exited with code {code}")
