"""The privacy ledger and budget: crash-safe, never counts a round twice, never exceeds the budget."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from crash_points import SimulatedCrash, crash_after
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from toy_task import toy_config  # also registers the "toy-dp" task

from fedrlhf_secure.commands import ledger as ledger_cli
from fedrlhf_secure.config import config_from_dict
from fedrlhf_secure.federation.engine import RunOptions, build_aggregator, resume_federation, run_federation
from fedrlhf_secure.privacy.budget import BudgetExceeded
from fedrlhf_secure.privacy.factory import build_client_privacy
from fedrlhf_secure.privacy.ledger import LedgerConflict, LedgerEntry, LedgerError, PrivacyLedger, check_ledger, read_ledger

CLIENT = {"mode": "client", "epsilon": 4.0, "delta": 1e-3, "clip_norm": 1.0, "noise": "distributed"}
RECORD = {"mode": "record", "epsilon": 4.0, "delta": 1e-2, "max_grad_norm": 1.0, "batch_size": 1, "accountant": "rdp"}


def _config(privacy: dict, **fed):
    raw = toy_config(**{"rounds": 3, "weighting": "uniform", "sparse_rows": "all", **fed})
    raw["task"]["kind"] = "toy-dp"
    raw["privacy"] = privacy
    return config_from_dict(raw)


def _ledger_spend(run: Path) -> dict[int, list[tuple[int, float, str]]]:
    _, entries = read_ledger(run / "ledger")
    return {c: [(e.round, e.epsilon_after, e.digest) for e in es] for c, es in entries.items()}


def _entry(client=0, round=0, digest="a" * 64, eps=1.0) -> LedgerEntry:
    return LedgerEntry(client, round, "gaussian", 1.0, 1.0, 1, 1.0, eps, 1e-5, digest)


# ------------------------------------------------------------------------------ the ledger itself


def test_an_identical_release_recorded_again_is_counted_once(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger", {"mode": "client"}, resume=False)
    ledger.record(_entry(round=0))
    ledger.record(_entry(round=0))
    reopened = PrivacyLedger(tmp_path / "ledger", {"mode": "client"}, resume=True)
    assert [e.round for e in reopened.entries(0)] == [0]
    assert json.loads((tmp_path / "ledger" / "client-0.json").read_text())["entries"][0]["digest"] == "a" * 64


def test_a_different_release_for_a_recorded_round_is_refused(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger", {"mode": "client"}, resume=False)
    ledger.record(_entry(round=0))
    with pytest.raises(LedgerConflict, match="round 0"):
        ledger.record(_entry(round=0, digest="b" * 64))
    assert len(ledger.entries(0)) == 1


def test_a_new_run_never_reuses_a_ledger_and_a_resume_keeps_its_plan(tmp_path):
    PrivacyLedger(tmp_path / "ledger", {"mode": "client", "epsilon_budget": 4.0}, resume=False).record(_entry())
    with pytest.raises(LedgerError, match="already holds a ledger"):
        PrivacyLedger(tmp_path / "ledger", {"mode": "client", "epsilon_budget": 4.0}, resume=False)
    with pytest.raises(LedgerError, match="must keep its privacy plan"):
        PrivacyLedger(tmp_path / "ledger", {"mode": "client", "epsilon_budget": 40.0}, resume=True)


def test_a_corrupt_ledger_file_is_an_error_not_a_reset(tmp_path):
    PrivacyLedger(tmp_path / "ledger", {"mode": "client"}, resume=False).record(_entry())
    (tmp_path / "ledger" / "client-0.json").write_text("{not json")
    with pytest.raises(LedgerError, match="client-0.json"):
        PrivacyLedger(tmp_path / "ledger", {"mode": "client"}, resume=True)


# ------------------------------------------------------------------------------ crash and resume


@pytest.mark.parametrize("privacy", [CLIENT, RECORD], ids=["client-level", "record-level"])
def test_a_run_killed_mid_round_and_resumed_ends_with_the_same_ledger_as_an_uninterrupted_run(tmp_path, privacy):
    whole = run_federation(_config(privacy), RunOptions(out=tmp_path / "whole", progress=False))

    with pytest.raises(SimulatedCrash):
        # 4 clients per round: the 6th commit is mid-round 1 (two clients of round 1 already recorded)
        run_federation(_config(privacy), RunOptions(out=tmp_path / "crash", progress=False, on_commit=crash_after(6)))
    [partial] = list((tmp_path / "crash").glob("*.partial"))
    before = _ledger_spend(partial)
    assert sum(len(v) for v in before.values()) == 6  # the released updates of the crashed round stay counted
    resumed = resume_federation(partial, RunOptions(progress=False))

    after, reference = _ledger_spend(resumed), _ledger_spend(whole)
    assert {c: [(r, e) for r, e, _ in v] for c, v in after.items()} == {c: [(r, e) for r, e, _ in v] for c, v in reference.items()}
    assert sum(len(v) for v in after.values()) == 4 * 3
    for c, rows in before.items():  # entries written before the crash are untouched (same release replayed)
        assert after[c][: len(rows)] == rows
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["privacy"]["epsilon_spent_max"] <= privacy["epsilon"]
    assert summary["privacy"]["epsilon_spent_max"] == pytest.approx(max(e for v in reference.values() for _, e, _ in v))


def test_resuming_twice_after_a_crash_never_adds_to_the_spend(tmp_path):
    with pytest.raises(SimulatedCrash):
        run_federation(_config(CLIENT), RunOptions(out=tmp_path, progress=False, on_commit=crash_after(2)))
    [partial] = list(tmp_path.glob("*.partial"))
    spent = _ledger_spend(partial)
    cfg = _config(CLIENT)
    plan = _client_privacy(cfg, {c: c + 1 for c in range(4)}, partial / "ledger", resume=True)
    plan2 = _client_privacy(cfg, {c: c + 1 for c in range(4)}, partial / "ledger", resume=True)
    assert [plan.spent(c) for c in range(4)] == [plan2.spent(c) for c in range(4)]
    assert _ledger_spend(partial) == spent


def _client_privacy(cfg, sizes, ledger_dir, resume):
    return build_client_privacy(cfg, sizes, ledger_dir, resume, build_aggregator(cfg, list(sizes)))


# ------------------------------------------------------------------------------ the budget


def test_clients_whose_next_round_would_exceed_the_budget_sit_out_and_the_run_stops(tmp_path, caplog):
    # a fixed noise multiplier with a budget that only covers two rounds of it
    privacy = {**CLIENT, "epsilon": 7.0, "noise_multiplier": 0.9, "accountant": "rdp"}
    run = run_federation(_config(privacy, rounds=5), RunOptions(out=tmp_path, progress=False))
    summary = json.loads((run / "summary.json").read_text())
    err = caplog.text
    assert "sits out round 2" in err and "> budget 7" in err
    assert summary["rounds_completed"] == 2
    assert "stopping" in summary["stopped_early"]
    assert 0 < summary["privacy"]["epsilon_spent_max"] <= 7.0
    assert all(len(v) == 2 for v in _ledger_spend(run).values())


def test_a_release_over_budget_is_refused_before_it_leaves_the_client(tmp_path):
    cfg = _config({**CLIENT, "epsilon": 1.0, "noise_multiplier": 0.5, "accountant": "rdp"})
    plan = _client_privacy(cfg, {c: 1 for c in range(4)}, tmp_path / "ledger", resume=False)
    plan.begin_round(0, 4)
    release = plan.add_noise(0, 0, plan.clip(np.ones(16, np.float32)), 1.0)
    with pytest.raises(BudgetExceeded, match="not sent"):
        plan.commit(0, 0, release, None)
    assert plan.ledger.entries(0) == []
    assert plan.admit(0, 0) is False


def test_the_ledger_command_prints_spend_per_client_and_in_total(tmp_path, capsys):
    run = run_federation(_config(CLIENT, rounds=2), RunOptions(out=tmp_path, progress=False))
    parser = __import__("argparse").ArgumentParser()
    ledger_cli.add_arguments(parser)
    assert ledger_cli.run(parser.parse_args([str(run), "--rounds"])) == 0
    out = capsys.readouterr().out
    eps = json.loads((run / "summary.json").read_text())["privacy"]["epsilon_spent_max"]
    assert f"total: ε = {eps:.4f}" in out
    assert out.count("| gaussian |") == 8
    for c in range(4):
        assert f"| {c} | 2 | 0,1 | {eps:.4f} |" in out
    assert not math.isnan(eps)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4)), min_size=1, max_size=25))
def test_replayed_commits_in_any_order_leave_one_entry_per_client_and_round(tmp_path_factory, keys):
    directory = tmp_path_factory.mktemp("ledger") / "ledger"
    ledger = PrivacyLedger(directory, {"mode": "client"}, resume=False)
    for c, r in keys:
        ledger.record(_entry(client=c, round=r, digest=f"{c}-{r}".ljust(64, "0")))
    reopened = PrivacyLedger(directory, {"mode": "client"}, resume=True)
    assert sorted((e.client, e.round) for e in reopened) == sorted(set(keys))
    check = check_ledger(directory)  # the manifest counts and chains exactly what the files hold
    assert check.ok and check.pending == {}
    assert {int(c): rec["count"] for c, rec in check.manifest["clients"].items()} == {
        c: len({r for cc, r in keys if cc == c}) for c, _ in keys
    }
    for c in reopened.clients():
        assert [e.round for e in reopened.entries(c)] == sorted({r for cc, r in keys if cc == c})
