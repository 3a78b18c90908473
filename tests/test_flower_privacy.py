"""Differential privacy over the node transport: the ledger and the budget live on the nodes.

Driven through :class:`InProcessLink` (the Flower deployment with the Grid replaced by direct
calls), like tests/test_flower_transport.py. Each node builds the privacy plan for the clients it
hosts and keeps their ledger under its own state directory; these tests pin that the ε it accounts
is exactly the in-process engine's, that the server's run directory holds no ledger, that a client
over budget is refused by its node, and that distributed noise shares are sized for the
federation-wide survivors, not for the node's own clients.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import yaml
from toy_task import toy_config  # also registers the "toy-dp" task

from fedrlhf_secure.config import config_from_dict
from fedrlhf_secure.federation.engine import RunOptions, run_federation, run_remote_federation
from fedrlhf_secure.federation.links import InProcessLink
from fedrlhf_secure.federation.node_protocol import REQUEST, RESPONSE, NodeMessage
from fedrlhf_secure.federation.participant import ParticipantHost
from fedrlhf_secure.federation.policy import NodePolicy
from fedrlhf_secure.privacy.ledger import read_ledger

NODES = {0: [0, 2], 1: [1, 3]}
RECORD = {"mode": "record", "epsilon": 4.0, "delta": 1e-2, "max_grad_norm": 1.0, "batch_size": 1, "accountant": "rdp"}
CLIENT = {"mode": "client", "epsilon": 4.0, "delta": 1e-3, "clip_norm": 1.0, "noise": "distributed"}


def _raw(privacy: dict, aggregation: str = "plain", **fed) -> dict:
    raw = toy_config(**{"rounds": 3, "weighting": "uniform", "sparse_rows": "all", **fed})
    raw["task"]["kind"] = "toy-dp"
    raw["aggregation"] = {"kind": aggregation}
    raw["privacy"] = privacy
    return raw


def _own(raw: dict) -> NodePolicy:
    """The nodes' policy when their operator runs ``raw`` themselves: no less than it asks."""
    return NodePolicy.from_config(config_from_dict(raw))


def _remote(tmp: Path, raw: dict) -> tuple[Path, dict[int, ParticipantHost]]:
    hosts = {n: ParticipantHost(c, None, state_dir=tmp / f"node-{n}", policy=_own(raw)) for n, c in NODES.items()}
    run = run_remote_federation(config_from_dict(raw), InProcessLink(hosts), NODES, RunOptions(out=tmp / "server", progress=False))
    return run, hosts


def _node_ledgers(hosts: dict[int, ParticipantHost]) -> dict[int, list]:
    out: dict[int, list] = {}
    for host in hosts.values():
        assert host.ledger_dir is not None and (host.ledger_dir / "plan.json").exists()
        _, entries = read_ledger(host.ledger_dir)
        assert sorted(entries) == sorted(host.client_ids)  # a node's ledger holds its own clients only
        out.update(entries)
    return out


def _accounting(entries: dict[int, list]) -> dict[int, list[tuple]]:
    """Everything a ledger entry says about ε (the digest of the noisy release differs run to run)."""
    return {
        c: [(e.round, e.mechanism, e.noise_multiplier, e.sample_rate, e.steps, e.sensitivity, e.epsilon_after, e.noise) for e in es]
        for c, es in entries.items()
    }


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_record_level_dp_over_nodes_accounts_exactly_the_engines_epsilon_on_the_nodes(tmp_path):
    raw = _raw(RECORD)
    local = run_federation(config_from_dict(raw), RunOptions(out=tmp_path / "local", progress=False))
    remote, hosts = _remote(tmp_path / "remote", raw)
    _, engine = read_ledger(local / "ledger")
    nodes = _node_ledgers(hosts)
    assert _accounting(nodes) == _accounting(engine)
    assert all(len(es) == 3 for es in nodes.values())
    assert not (remote / "ledger").exists()
    assert not list((tmp_path / "remote" / "server").rglob("client-*.json"))
    for n, hosted in hosts.items():
        assert hosted.ledger_dir is not None and hosted.ledger_dir.is_relative_to(tmp_path / "remote" / f"node-{n}")
    a, b = _rows(local), _rows(remote)
    assert [r["privacy_epsilon_spent_max"] for r in b] == [r["privacy_epsilon_spent_max"] for r in a]
    assert b[-1]["privacy_epsilon_spent_max"] > 0
    summary = json.loads((remote / "summary.json").read_text())["privacy"]
    assert summary["reported_by"] == "clients"
    assert summary["epsilon_per_client"] == {str(c): es[-1].epsilon_after for c, es in sorted(engine.items())}


def test_a_client_over_its_budget_is_refused_by_its_node_and_the_run_stops_like_the_engine(tmp_path):
    # a fixed noise multiplier with a budget that client 0 (the most batches) exhausts after two rounds
    raw = _raw({**RECORD, "noise_multiplier": 1.5, "epsilon": 3.0}, rounds=4)
    local = run_federation(config_from_dict(raw), RunOptions(out=tmp_path / "local", progress=False))
    remote, hosts = _remote(tmp_path / "remote", raw)
    a, b = _rows(local), _rows(remote)
    assert [r["clients_refused"] for r in b] == [r["clients_refused"] for r in a] == [0, 0, 1, 2]
    assert [r["clients_aggregated"] for r in b] == [r["clients_aggregated"] for r in a]
    _, engine = read_ledger(local / "ledger")
    nodes = _node_ledgers(hosts)
    assert _accounting(nodes) == _accounting(engine)
    assert [e.round for e in nodes[0]] == [0, 1]
    assert max(e.epsilon_after for es in nodes.values() for e in es) <= 3.0
    # asked directly, client 0's node refuses it for the next round and reports its ε as spent
    resp = NodeMessage.decode(hosts[0].handle(NodeMessage("admit", {"round": 4, "clients": [0, 2]}).encode(REQUEST)), RESPONSE)
    assert 0 not in resp.header["admitted"]
    assert resp.header["epsilon_spent"]["0"] == nodes[0][-1].epsilon_after
    assert json.loads((remote / "summary.json").read_text())["privacy"]["clients_refused"] == 2


class _RecordingAggregator:
    """The node's aggregator, noting the integer noise share each client hands to it."""

    def __init__(self, inner, seen: list) -> None:
        self.inner, self.seen = inner, seen

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def client(self, ctx, client_id, vector, weight, **kwargs):
        self.seen.append(kwargs["integer_noise"])
        return self.inner.client(ctx, client_id, vector, weight, **kwargs)


def test_distributed_noise_shares_on_nodes_are_sized_for_the_federations_survivors(tmp_path, monkeypatch):
    from fedrlhf_secure.federation import aggregators as aggregator_keys

    seen: list = []
    real = aggregator_keys.node_aggregator
    monkeypatch.setattr(aggregator_keys, "node_aggregator", lambda *a: _RecordingAggregator(real(*a), seen))
    raw = _raw(CLIENT, "secagg", rounds=2)
    raw["aggregation"]["noise_bound"] = 5_000_000
    local = run_federation(config_from_dict(raw), RunOptions(out=tmp_path / "local", progress=False))
    remote, hosts = _remote(tmp_path / "remote", raw)
    _, engine = read_ledger(local / "ledger")
    nodes = _node_ledgers(hosts)
    assert _accounting(nodes) == _accounting(engine)
    assert all(e.mechanism == "skellam" and e.noise == "distributed" for es in nodes.values() for e in es)
    # each share is calibrated for m = max(min_clients, ceil(survivor_fraction 1.0 x 4 admitted)) = 4 survivors
    # federation-wide; sizing it for the node's own 2 clients would give sqrt(2) x larger shares
    plan = hosts[0].privacy
    assert [plan.survivors_required(r) for r in (0, 1)] == [4, 4]
    variance, _, _ = plan._ensure_skellam(hosts[0].codec.dim)
    assert len(seen) == 8  # 4 clients x 2 rounds
    pooled = np.concatenate(seen).astype(np.float64) / math.sqrt(variance / 4)
    assert pooled.size == 8 * hosts[0].codec.dim == 128  # std estimate within ~0.07
    assert 0.75 < float(pooled.std()) < 1.3  # sqrt(2) = 1.41 if sized for the node's 2 clients
    assert len(_rows(remote)) == 2


class _GarbledAdmission:
    """A node whose admission answers are malformed (``admitted`` is not a list of ids)."""

    def __init__(self, host: ParticipantHost) -> None:
        self.host = host

    def handle(self, data: bytes) -> bytes:
        if NodeMessage.decode(data, REQUEST).op == "admit":
            return NodeMessage("admit", {"admitted": "all of them"}).encode(RESPONSE)
        return self.host.handle(data)


def test_a_node_with_a_malformed_admission_sits_out_and_the_run_goes_on(tmp_path, capsys):
    raw = _raw(RECORD, rounds=2)
    hosts = {n: ParticipantHost(c, None, state_dir=tmp_path / f"node-{n}", policy=_own(raw)) for n, c in NODES.items()}
    link = InProcessLink({0: _GarbledAdmission(hosts[0]), 1: hosts[1]})
    run = run_remote_federation(config_from_dict(raw), link, NODES, RunOptions(out=tmp_path / "server", progress=False))
    rows = _rows(run)
    assert [(r["clients_refused"], r["clients_aggregated"]) for r in rows] == [(2, 2), (2, 2)]
    assert "node 0 sent a malformed admission" in capsys.readouterr().err
    _, entries = read_ledger(hosts[1].ledger_dir)
    assert {c: len(es) for c, es in entries.items()} == {1: 2, 3: 2}


def test_a_node_without_a_state_directory_refuses_a_dp_run():
    raw = _raw(RECORD)
    setup = NodeMessage("setup", {"client_ids": [0, 1, 2, 3]}, blobs={"config": yaml.safe_dump(raw).encode()})
    err = NodeMessage.decode(ParticipantHost([0], None, policy=_own(raw)).handle(setup.encode(REQUEST)), RESPONSE).header["error"]
    assert "--state-dir" in err
