"""``fedrlhf ledger RUN``: ε recomputed from the entries with the accountant, chains verified, exit 1 on any mismatch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from toy_task import toy_config  # also registers the "toy-dp" task

from fedrlhf_secure.cli import main as cli
from fedrlhf_secure.commands.ledger import recompute_epsilon
from fedrlhf_secure.config import config_from_dict
from fedrlhf_secure.federation.engine import RunOptions, run_federation
from fedrlhf_secure.privacy.accountants import GaussianAccountant, GaussianRelease
from fedrlhf_secure.privacy.ledger import MANIFEST, LedgerEntry, chain_head, client_file, read_ledger

RECORD = {"mode": "record", "epsilon": 4.0, "delta": 1e-2, "max_grad_norm": 1.0, "batch_size": 1, "accountant": "rdp"}
CLIENT = {"mode": "client", "epsilon": 4.0, "delta": 1e-3, "clip_norm": 1.0, "noise": "distributed", "accountant": "rdp"}
SECAGG = {"kind": "secagg", "levels": 65536, "noise_bound": 8_000_000}  # integer domain: Skellam shares


def _run(tmp_path: Path, privacy: dict, aggregation: dict | None = None, **fed) -> Path:
    raw = toy_config(**{"rounds": 3, "weighting": "uniform", "sparse_rows": "all", **fed})
    raw["task"]["kind"] = "toy-dp"
    raw["privacy"] = privacy
    if aggregation is not None:
        raw["aggregation"] = aggregation
    return run_federation(config_from_dict(raw), RunOptions(out=tmp_path, progress=False))


@pytest.fixture(scope="module")
def record_run(tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("record"), RECORD)


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / run.name
    shutil.copytree(run, dst)
    return dst


def _forge(ledger: Path, client: int, edit) -> None:
    """Rewrite a client's entries *and* the manifest consistently: the chain then verifies, only the
    accountant can tell."""
    path = ledger / client_file(client)
    raw = json.loads(path.read_text())
    raw["entries"] = edit(raw["entries"])
    path.write_text(json.dumps(raw))
    rows = [LedgerEntry.from_mapping(e, path) for e in raw["entries"]]
    manifest = json.loads((ledger / MANIFEST).read_text())
    manifest["clients"][str(client)] = {"file": path.name, "count": len(rows), "head": chain_head(client, rows)}
    (ledger / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("privacy", "aggregation", "mechanism"),
    [(RECORD, None, "dp-sgd"), (CLIENT, None, "gaussian"), (CLIENT, SECAGG, "skellam")],
    ids=["record-level dp-sgd", "client-level gaussian", "client-level skellam under secagg"],
)
def test_the_recomputed_epsilon_of_an_honest_run_equals_the_stored_one_and_the_command_exits_0(
    tmp_path, capsys, privacy, aggregation, mechanism
):
    run = _run(tmp_path, privacy, aggregation)
    header, entries = read_ledger(run / "ledger")
    assert {e.mechanism for rows in entries.values() for e in rows} == {mechanism}
    for rows in entries.values():
        assert recompute_epsilon(header, rows) == pytest.approx([e.epsilon_after for e in rows], rel=1e-9, abs=1e-12)
    assert cli(["ledger", str(run), "--rounds"]) == 0
    out = capsys.readouterr().out
    eps = json.loads((run / "summary.json").read_text())["privacy"]["epsilon_spent_max"]
    assert f"total: ε = {eps:.4f} (recomputed" in out and "verified against the manifest" in out
    for c, rows in entries.items():
        spent = rows[-1].epsilon_after
        assert 0 < spent <= 4.0
        assert f"| {c} | 3 | 0,1,2 | {spent:.4f} | {spent:.4f} |" in out
    assert out.count(f"| {mechanism} |") == 12
    assert "MISMATCH" not in out


def test_the_recomputed_epsilon_is_the_accountants_composition_of_the_entries(record_run):
    header, entries = read_ledger(record_run / "ledger")
    rows = entries[3]
    direct = GaussianAccountant("rdp").epsilon([GaussianRelease(e.noise_multiplier, e.sample_rate, e.steps) for e in rows], 1e-2)
    assert recompute_epsilon(header, rows)[-1] == pytest.approx(direct, rel=1e-12)
    assert 0 < direct <= 4.0


def test_a_forged_stored_epsilon_with_a_consistent_chain_is_caught_by_the_recomputation(record_run, tmp_path, capsys):
    run = _copy(record_run, tmp_path)
    _, honest = read_ledger(run / "ledger")
    true_eps = honest[2][-1].epsilon_after
    true_total = max(rows[-1].epsilon_after for rows in honest.values())

    def lower(es):
        for e in es:
            e["epsilon_after"] /= 4
        return es

    _forge(run / "ledger", 2, lower)
    _, forged = read_ledger(run / "ledger")  # the chain is consistent: the manifest check alone accepts it
    stored = max(e.epsilon_after for e in forged[2])
    assert stored == pytest.approx(true_eps / 4)
    assert cli(["ledger", str(run)]) == 1
    out = capsys.readouterr().out
    print(f"\nforged client 2: stored ε = {stored:.4f}, recomputed ε = {true_eps:.4f}")
    assert f"| 2 | 3 | 0,1,2 | {true_eps:.4f} | {stored:.4f} |" in out
    assert f"MISMATCH: {run / 'ledger' / 'client-2.json'}: round 2 stores ε = {stored:.6f}" in out
    assert f"total: ε = {true_total:.4f} (recomputed" in out


def test_an_altered_entry_without_a_matching_manifest_fails_the_chain_check(record_run, tmp_path, capsys):
    run = _copy(record_run, tmp_path)
    path = run / "ledger" / client_file(1)
    raw = json.loads(path.read_text())
    raw["entries"][1]["steps"] = 1
    path.write_text(json.dumps(raw))
    assert cli(["ledger", str(run)]) == 1
    out = capsys.readouterr().out
    assert f"MISMATCH: {path}: hash chain mismatch" in out and "hash chains NOT verified" in out


def test_the_ledger_of_a_dp_run_deleted_entirely_is_an_error_not_no_ledger(record_run, tmp_path, capsys):
    run = _copy(record_run, tmp_path)
    shutil.rmtree(run / "ledger")
    assert cli(["ledger", str(run)]) == 1
    err = capsys.readouterr().err
    assert f"{run / 'ledger'}: missing, but {run / 'config.yaml'} says privacy.mode: record" in err


def test_the_ledger_of_a_run_without_dp_is_bad_input(tmp_path, capsys):
    raw = toy_config(rounds=1)
    run = run_federation(config_from_dict(raw), RunOptions(out=tmp_path, progress=False))
    assert cli(["ledger", str(run)]) == 2
    assert "no privacy ledger" in capsys.readouterr().err


def test_a_deleted_client_file_is_shown_as_missing_and_the_total_as_a_lower_bound(record_run, tmp_path, capsys):
    run = _copy(record_run, tmp_path)
    (run / "ledger" / client_file(3)).unlink()
    assert cli(["ledger", str(run)]) == 1
    out = capsys.readouterr().out
    assert "| 3 | 3 in the manifest, file missing | ? | ? | ? |" in out
    assert "total: ε ≥ " in out and "9 releases by 3 clients (3 more releases of 1 clients are missing)" in out
    assert f"MISMATCH: {run / 'ledger' / 'client-3.json'}: missing (deleted or renamed)" in out


def test_the_ledger_of_the_current_directory_is_found_when_the_run_is_named_dot(record_run, tmp_path, capsys, monkeypatch):
    """``fedrlhf ledger .`` inside a run directory: "." has no name, so the lookup resolves it first
    (it used to end in a ValueError traceback from ``Path.with_name``)."""
    monkeypatch.chdir(_copy(record_run, tmp_path))
    assert cli(["ledger", "."]) == 0
    assert "verified against the manifest" in capsys.readouterr().out
