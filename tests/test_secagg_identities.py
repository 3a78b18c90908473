"""SecAgg identities over a deployment: the registry `fedrlhf keys` makes, what each party loads
from it, and the refusals when it is missing or does not match."""

from __future__ import annotations

import json

import pytest
import yaml
from toy_task import toy_config

from aggregation.secagg.crypto import public_raw
from fedrlhf_secure.cli import main as cli
from fedrlhf_secure.config import config_from_dict
from fedrlhf_secure.federation.aggregators import deal_keys, node_aggregator, server_aggregator
from fedrlhf_secure.keys import KeyFileError, deal_secagg_identities


def _config(tmp_path):
    raw = toy_config()
    raw["aggregation"] = {"kind": "secagg"}
    path = tmp_path / "secagg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, config_from_dict(raw)


def test_deal_keys_makes_a_registry_every_party_loads_and_private_keys_only_on_their_node(tmp_path):
    path, cfg = _config(tmp_path)
    nodes = [[0, 2], [1, 3]]
    deal_keys(path, nodes, tmp_path / "server", [tmp_path / "n0", tmp_path / "n1"], tmp_path / "reg")
    server = server_aggregator(cfg, [0, 1, 2, 3], tmp_path / "server")
    node0 = node_aggregator(cfg, [0, 1, 2, 3], [0, 2], tmp_path / "n0")
    assert server.identities.private == {} and sorted(node0.identities.private) == [0, 2]
    assert {c: public_raw(k) for c, k in server.identities.public.items()} == {c: public_raw(k) for c, k in node0.identities.public.items()}
    assert sorted(p.name for p in (tmp_path / "server").iterdir()) == ["secagg-registry.json"]
    assert (tmp_path / "n0" / "secagg-identity-0.key").stat().st_mode & 0o777 == 0o600


def test_a_deployment_without_the_registry_or_with_a_foreign_key_is_refused(tmp_path):
    _, cfg = _config(tmp_path)
    with pytest.raises(KeyFileError, match="needs the server's key directory with secagg-registry.json"):
        server_aggregator(cfg, [0, 1, 2, 3], None)
    with pytest.raises(KeyFileError, match="missing key file .*secagg-registry.json"):
        node_aggregator(cfg, [0, 1, 2, 3], [0], tmp_path)
    deal_secagg_identities([[0, 1, 2, 3]], tmp_path / "s", [tmp_path / "a"], tmp_path / "r1")
    deal_secagg_identities([[0, 1, 2, 3]], tmp_path / "s2", [tmp_path / "b"], tmp_path / "r2")
    (tmp_path / "a" / "secagg-identity-2.key").write_bytes((tmp_path / "b" / "secagg-identity-2.key").read_bytes())
    with pytest.raises(KeyFileError, match="does not match client 2's identity"):
        node_aggregator(cfg, [0, 1, 2, 3], [2], tmp_path / "a")
    reg = json.loads((tmp_path / "s" / "secagg-registry.json").read_text())
    del reg["clients"]["3"]
    (tmp_path / "s" / "secagg-registry.json").write_text(json.dumps(reg))
    with pytest.raises(KeyFileError, match="client 3 of this run has no registered identity"):
        server_aggregator(cfg, [0, 1, 2, 3], tmp_path / "s")


def test_keys_cli_makes_identities_and_the_registry(tmp_path, capsys):
    for c in (0, 1):
        assert cli(["keys", "secagg-identity", "--id", str(c), "--out", str(tmp_path / "pubs")]) == 0
    assert cli(["keys", "secagg-registry", "--pubs", str(tmp_path / "pubs"), "--out", str(tmp_path)]) == 0
    reg = json.loads((tmp_path / "secagg-registry.json").read_text())
    assert sorted(reg["clients"]) == ["0", "1"] and all(len(v) == 64 for v in reg["clients"].values())
