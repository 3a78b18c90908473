"""Under DP nothing computed from a client's data leaves it un-noised: the real frames, inspected.

A MovieLens federation (generated ML-100K files) runs over :class:`InProcessLink` to participant
hosts on "nodes", exactly as over Flower; a recording link keeps every byte the server receives.
Under record- and client-level DP no ``fed/report`` frame and no fit summary carries a metric
(no loss, no count, no correct/n, no train_* number, no Spearman); the held-out numbers are in the
client's own ``client_metrics.jsonl``. The same inspection, run against a deliberately weakened
host that lets its numbers out as without DP, finds them (so the check can fail).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from movielens_fixtures import write_ml100k

from aggregation import wire
from fedrlhf_secure.config import config_from_dict
from fedrlhf_secure.federation.engine import RunOptions, run_federation, run_remote_federation
from fedrlhf_secure.federation.links import InProcessLink
from fedrlhf_secure.federation.messages import REPORT
from fedrlhf_secure.federation.node_protocol import RESPONSE, NodeMessage
from fedrlhf_secure.federation.participant import LOCAL_METRICS_FILE, ParticipantHost, PlaintextPolicy
from fedrlhf_secure.federation.policy import NodePolicy

NODES = {0: [0, 2, 4], 1: [1, 3, 5]}
RECORD = {"mode": "record", "epsilon": 8.0, "delta": 1e-3, "max_grad_norm": 0.5, "batch_size": 8, "accountant": "rdp"}
CLIENT = {"mode": "client", "epsilon": 8.0, "delta": 1e-2, "clip_norm": 1.0, "noise": "distributed", "accountant": "rdp"}
LEAKY_KEYS = {"correct", "n", "accuracy", "train_correct", "train_n", "train_accuracy", "spearman", "loss", "steps"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ml")
    write_ml100k(root, n_users=6, n_items=40, per_user=20)
    return root


def _config(privacy: dict[str, Any]) -> Any:
    weighting = "uniform" if privacy["mode"] == "client" else "examples"
    raw = {
        "seed": 0,
        "task": {"kind": "movielens", "split": "u1", "user_dim": 4, "item_dim": 4, "genre_dim": 2, "hidden_dim": 8, "personal_epochs": 1},
        "federation": {"rounds": 2, "local_epochs": 1, "min_clients": 2, "weighting": weighting},
        "aggregation": {"kind": "plain"},
        "privacy": privacy,
    }
    return config_from_dict(raw)


class RecordingLink(InProcessLink):
    """The deployment's link with the Grid replaced by direct calls; keeps every response's bytes."""

    def __init__(self, hosts) -> None:
        super().__init__(hosts)
        self.received: list[bytes] = []

    def exchange(self, requests, timeout):
        out = super().exchange(requests, timeout)
        self.received.extend(out.values())
        return out


class LeakyHost(ParticipantHost):
    """Weakened: lets its clients' numbers out in plaintext as if no DP were on."""

    def _plaintext_policy(self, config):
        return PlaintextPolicy(private=False)


def plaintext_numbers(frames: list[bytes]) -> dict[str, int]:
    """Every metric name the server received in plaintext (fit summaries and report frames), with counts."""
    found: dict[str, int] = {}

    def note(metrics: dict) -> None:
        for k in metrics:
            found[k] = found.get(k, 0) + 1

    for raw in frames:
        msg = NodeMessage.decode(raw, RESPONSE)
        for entry in (msg.header.get("fit") or {}).values():
            note(entry.get("metrics", {}))
            assert set(entry) <= {"metrics", "epsilon_spent"}, entry
        for frames_of_client in msg.messages.values():
            for frame in frames_of_client:
                decoded = wire.decode(frame)
                if decoded.kind == REPORT:
                    note(decoded.header["metrics"])
    return found


def _remote(tmp: Path, data_dir: Path, privacy: dict[str, Any], host=ParticipantHost) -> tuple[Path, RecordingLink, dict]:
    config = _config(privacy)
    policy = NodePolicy.from_config(config)  # each node's own policy: exactly what the user runs
    hosts = {n: host(c, data_dir, state_dir=tmp / f"node-{n}", policy=policy) for n, c in NODES.items()}
    link = RecordingLink(hosts)
    run = run_remote_federation(config, link, NODES, RunOptions(data_dir=data_dir, out=tmp / "server", progress=False))
    return run, link, hosts


@pytest.mark.parametrize("privacy", [RECORD, CLIENT], ids=["record", "client"])
def test_under_dp_no_client_number_reaches_the_server_and_the_held_out_ones_stay_on_the_client(tmp_path, data_dir, privacy):
    run, link, hosts = _remote(tmp_path, data_dir, privacy)
    assert link.received, "the recording link saw no frames"
    assert plaintext_numbers(link.received) == {}
    # the server's metrics have no accuracy, count or loss; the clients' files do (held-out only)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("heldout_accuracy" not in r and "train_accuracy" not in r for r in rows)
    for n, host in hosts.items():
        local = [json.loads(line) for line in (host.ledger_dir.parent / LOCAL_METRICS_FILE).read_text().splitlines()]
        assert {row["client"] for row in local} == set(NODES[n]) and {row["round"] for row in local} == {0, 1}
        for row in local:
            assert {"correct", "n", "accuracy"} <= set(row["metrics"]) and not any(k.startswith("train_") for k in row["metrics"])


def test_the_same_inspection_catches_a_weakened_host_that_leaks_its_numbers(tmp_path, data_dir):
    _, link, _ = _remote(tmp_path, data_dir, RECORD, host=LeakyHost)
    leaked = plaintext_numbers(link.received)
    assert LEAKY_KEYS - {"accuracy"} <= set(leaked)  # loss, steps, correct, n, train_*, spearman
    assert leaked["loss"] == 2 * 6 and leaked["train_n"] == 2 * 6  # every client, every round


def test_without_dp_the_reports_still_carry_the_numbers(tmp_path, data_dir):
    _, link, _ = _remote(tmp_path, data_dir, {"mode": "none"})
    assert {"correct", "n", "train_n", "loss"} <= set(plaintext_numbers(link.received))


def test_the_in_process_runner_pools_the_clients_local_files_and_says_so(tmp_path, data_dir):
    run = run_federation(_config(RECORD), RunOptions(data_dir=data_dir, out=tmp_path, progress=False))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    local = [json.loads(line) for line in (run / LOCAL_METRICS_FILE).read_text().splitlines()]
    for r in rows:
        mine = [x["metrics"] for x in local if x["round"] == r["round"]]
        assert r["heldout_accuracy"] == pytest.approx(sum(m["correct"] for m in mine) / sum(m["n"] for m in mine))
        assert "train_accuracy" not in r and "local" in r["metrics_source"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["privacy"]["relation"] == "replace-one"
    assert summary["final"]["heldout_accuracy"] == rows[-1]["heldout_accuracy"]
