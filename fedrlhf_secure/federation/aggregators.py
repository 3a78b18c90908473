"""Building the aggregator on each side of a deployment, where keys come from files, not memory.

In process, ``aggregation: {kind: ckks}`` deals a fresh CKKS key through a simulated dealer held
by the same process. Across machines that would put the secret key next to the server, so here
the server and every node build the aggregator from the files of ``fedrlhf keys`` (the offline
dealer ceremony, docs/ckks.md):

* the server's key directory holds ``dealer.pub`` and ``public-context.frame`` (no key at all);
* a node's key directory holds ``dealer.pub`` and, for each client ``c`` it hosts,
  ``client-c.key`` (its X25519 key, made on the node) and ``package-client-c.frame``.

Every file is authenticated against the pinned dealer key before use. SecAgg's per-round keys
are made inside the client halves, but they are signed with each client's long-term identity,
whose public halves every party reads from ``secagg-registry.json`` in its key directory
(``fedrlhf keys secagg-registry``); a node also reads ``secagg-identity-<c>.key`` of each client it
hosts. Without that registry a deployment refuses to run secagg: unsigned keys would let the
server substitute them (issue 12 item 3).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from aggregation.base import Aggregator, spec_for

from ..config import RunConfig
from ..configtypes import ConfigError
from ..keys import KeyFileError, deal_run_keys, load_client_key, load_dealer_pub, load_public_context, load_secagg_identities
from ..keys import require as _need

__all__ = ["KeyFileError", "NodeFileKeys", "ServerFileKeys", "deal_keys", "node_aggregator", "server_aggregator"]


class ServerFileKeys:
    """The CKKS :class:`~aggregation.ckks.protocol.KeySource` of the server: the public context only."""

    def __init__(self, keys_dir: Path, config) -> None:
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

        keys_dir = Path(keys_dir)
        dealer = load_dealer_pub(_need(keys_dir / "dealer.pub"))
        self.keys = {}
        for c in client_ids:
            me = load_client_key(_need(keys_dir / f"client-{c}.key"))
            if me.client_id != c:
                raise KeyFileError(f"{keys_dir / f'client-{c}.key'} belongs to client {me.client_id}, not {c}")
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


def build_aggregator(config: RunConfig, client_ids: list[int]) -> Aggregator:
    """The in-memory aggregator of ``config`` (what a run without key files uses; as the engine builds it)."""
    return spec_for(config.aggregation.kind).factory(config.aggregation.params, client_ids, config.seed)


def _check_ckks(config: RunConfig) -> None:
    if getattr(config.aggregation.params, "rotate_keys", "run") != "run":
        raise ConfigError(
            "aggregation.rotate_keys: round needs a key ceremony per round; deployments deal one key per run (rotate_keys: run)"
        )


def _secagg(config: RunConfig, client_ids: Sequence[int], hosted: Sequence[int], keys_dir: Path | None, who: str) -> Aggregator:
    from aggregation.secagg import SecAggAggregator

    if keys_dir is None:
        raise KeyFileError(
            f"aggregation.kind secagg over a deployment needs {who} key directory with secagg-registry.json "
            "(`fedrlhf keys secagg-identity` / `secagg-registry`; `fedrlhf deploy local` makes them)"
        )
    identities = load_secagg_identities(Path(keys_dir), list(client_ids), hosted)
    return SecAggAggregator(config.aggregation.params, len(client_ids), identities)


def server_aggregator(config: RunConfig, client_ids: Sequence[int], keys_dir: Path | None) -> Aggregator:
    if config.aggregation.kind == "secagg":
        return _secagg(config, client_ids, (), keys_dir, "the server's")
    if config.aggregation.kind != "ckks":
        return build_aggregator(config, list(client_ids))
    from aggregation.ckks import CKKSAggregator

    _check_ckks(config)
    if keys_dir is None:
        raise KeyFileError("aggregation.kind ckks over Flower needs the server's key directory (run config keys-dir)")
    keys = ServerFileKeys(keys_dir, config.aggregation.params)
    return CKKSAggregator(config.aggregation.params, keys, list(client_ids), _ckks_masks(config, client_ids, (), keys_dir))


def node_aggregator(config: RunConfig, client_ids: Sequence[int], hosted: Sequence[int], keys_dir: Path | None) -> Aggregator:
    if config.aggregation.kind == "secagg":
        return _secagg(config, client_ids, hosted, keys_dir, "this node's")
    if config.aggregation.kind != "ckks":
        return build_aggregator(config, list(client_ids))
    from aggregation.ckks import CKKSAggregator

    _check_ckks(config)
    if keys_dir is None:
        raise KeyFileError("aggregation.kind ckks needs this node's key directory (fedrlhf deploy client-host --keys-dir)")
    keys = NodeFileKeys(keys_dir, config.aggregation.params, hosted)
    return CKKSAggregator(config.aggregation.params, keys, list(client_ids), _ckks_masks(config, client_ids, hosted, keys_dir))


def _ckks_masks(config: RunConfig, client_ids: Sequence[int], hosted: Sequence[int], keys_dir: Path) -> Aggregator:
    """The SecAgg+ aggregator of CKKS's mask round, signing under the deployment's identity registry:
    identities made per process (the in-memory default) could not be checked across machines."""
    from aggregation.ckks import masking
    from aggregation.ckks.protocol import masking_config
    from aggregation.secagg import SecAggAggregator

    params = config.aggregation.params
    identities = load_secagg_identities(Path(keys_dir), list(client_ids), hosted)
    return SecAggAggregator(masking_config(params, masking.plan(params, len(client_ids))), len(client_ids), identities)


def deal_keys(
    config_path: Path, node_clients: Sequence[Sequence[int]], server_dir: Path, node_dirs: Sequence[Path], dealer_dir: Path
) -> None:
    """The whole ``fedrlhf keys`` ceremony on one machine (for ``fedrlhf deploy local`` and tests):
    :func:`fedrlhf_secure.keys.deal_run_keys`, the library function the ``keys`` command also calls."""
    deal_run_keys(config_path, node_clients, server_dir, node_dirs, dealer_dir)
