"""The privacy ledger fails closed: a resumed run refuses a ledger that lost or altered entries.

Every damage case is applied to a copy of one real interrupted DP run (configs/movielens-tiny.yaml,
6 clients, record-level DP-SGD, killed after 9 of its 12 ledger commits) and ``--resume`` must
refuse it with an error naming the file. The same deletion resumed through a deliberately weakened
ledger (the pre-manifest behaviour, a test helper below) is accepted and under-reports ε, which is
what the refusal prevents.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from crash_points import SimulatedCrash, crash_after
from toy_task import toy_config  # also registers the "toy-dp" task

from fedrlhf_secure.cli import main as cli
from fedrlhf_secure.config import config_from_dict, load_config
from fedrlhf_secure.federation import engine
from fedrlhf_secure.federation.engine import RunOptions, resume_federation, run_federation
from fedrlhf_secure.federation.node_protocol import REQUEST, RESPONSE, NodeMessage
from fedrlhf_secure.federation.participant import ParticipantHost
from fedrlhf_secure.privacy import factory
from fedrlhf_secure.privacy.ledger import (
    MANIFEST,
    PLAN,
    LedgerEntry,
    LedgerIncomplete,
    PrivacyLedger,
    _load_client_file,
    check_ledger,
    client_file,
    read_ledger,
)

TINY = Path(__file__).resolve().parents[1] / "configs" / "movielens-tiny.yaml"
OVERRIDES = [
    "task.num_clients=6",
    "federation.rounds=2",
    "privacy.mode=record",
    "privacy.epsilon=4",
    "privacy.delta=1e-5",
    "privacy.accountant=rdp",
]
COMMITS_BEFORE_CRASH = 9  # round 0 (6 clients) and half of round 1


# ------------------------------------------------------------------------------ the weakened ledger


class WeakLedger(PrivacyLedger):
    """The ledger as it was before the manifest: a resume re-creates whatever is missing (plan,
    manifest, the directory itself) and trusts whatever client files are left. Tests only."""

    def _reopen(self) -> dict[int, list[LedgerEntry]]:
        self.directory.mkdir(parents=True, exist_ok=True)
        if not (self.directory / PLAN).exists():
            (self.directory / PLAN).write_text(json.dumps(self.header))
        if not (self.directory / MANIFEST).exists():
            plan = json.loads((self.directory / PLAN).read_text())
            from fedrlhf_secure.privacy.ledger import _plan_sha256

            (self.directory / MANIFEST).write_text(json.dumps({"version": 1, "plan_sha256": _plan_sha256(plan), "clients": {}}))
        entries = {}
        for path in sorted(self.directory.glob("client-*.json")):
            rows = _load_client_file(path)
            if rows:
                entries[rows[0].client] = rows
                with self._locked():
                    self._write_manifest_record(rows[0].client, rows)  # trust on first use
        return entries


def _weakened(monkeypatch) -> None:
    monkeypatch.setattr(factory, "PrivacyLedger", WeakLedger)
    monkeypatch.setattr(engine, "check_resumable_ledger", lambda run, config: None)


# ------------------------------------------------------------------------------ a real interrupted DP run


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, shared_datasets) -> Path:
    """A .partial movielens-tiny record-level DP run killed after 9 of its 12 ledger commits (read-only: copy it)."""
    out = tmp_path_factory.mktemp("interrupted")
    config = load_config(TINY, OVERRIDES)
    with pytest.raises(SimulatedCrash):
        run_federation(config, RunOptions(data_dir=shared_datasets, out=out, progress=False, on_commit=crash_after(COMMITS_BEFORE_CRASH)))
    [partial] = list(out.glob("*.partial"))
    _, entries = read_ledger(partial / "ledger")
    assert sum(len(v) for v in entries.values()) == COMMITS_BEFORE_CRASH
    assert (partial / "checkpoint" / "state.json").exists()  # round 0 completed: a real resume point
    return partial


def _copy(partial: Path, tmp_path: Path) -> Path:
    dst = tmp_path / partial.name
    shutil.copytree(partial, dst)
    return dst


def _two_round_client(ledger: Path) -> int:
    _, entries = read_ledger(ledger)
    return min(c for c, rows in entries.items() if len(rows) == 2)


def _rewrite_entries(path: Path, edit) -> None:
    raw = json.loads(path.read_text())
    raw["entries"] = edit(raw["entries"])
    path.write_text(json.dumps(raw, indent=2))


def _delete(ledger: Path, c: int) -> str:
    (ledger / client_file(c)).unlink()
    return client_file(c)


def _rename_aside(ledger: Path, c: int) -> str:
    (ledger / client_file(c)).rename(ledger / f"{client_file(c)}.bak")
    return client_file(c)


def _rename_over_another(ledger: Path, c: int) -> str:
    other = max(int(p.stem.split("-")[1]) for p in ledger.glob("client-*.json"))
    (ledger / client_file(c)).replace(ledger / client_file(other))
    return client_file(c)


def _empty(ledger: Path, c: int) -> str:
    _rewrite_entries(ledger / client_file(c), lambda es: [])
    return client_file(c)


def _truncate(ledger: Path, c: int) -> str:
    _rewrite_entries(ledger / client_file(c), lambda es: es[:1])
    return client_file(c)


def _tamper(ledger: Path, c: int) -> str:
    # claim round 0 used twice the noise: the client's recorded spend drops, the file stays well-formed
    def edit(es):
        es[0]["noise_multiplier"] *= 2
        es[0]["epsilon_after"] /= 2
        return es

    _rewrite_entries(ledger / client_file(c), edit)
    return client_file(c)


def _delete_manifest(ledger: Path, c: int) -> str:
    (ledger / MANIFEST).unlink()
    return MANIFEST


def _delete_plan(ledger: Path, c: int) -> str:
    (ledger / PLAN).unlink()
    return PLAN


def _delete_directory(ledger: Path, c: int) -> str:
    shutil.rmtree(ledger)
    return str(ledger)


def _rename_directory(ledger: Path, c: int) -> str:
    ledger.rename(ledger.with_name("ledger.old"))
    return str(ledger)


DAMAGE = {
    "client file deleted": (_delete, "missing"),
    "client file renamed aside": (_rename_aside, "missing"),
    "client file renamed over another client's": (_rename_over_another, "missing"),
    "client file emptied": (_empty, "emptied"),
    "client file truncated to its first entry": (_truncate, "truncated"),
    "entry altered (less spend)": (_tamper, "hash chain mismatch"),
    "manifest deleted": (_delete_manifest, "missing"),
    "plan deleted": (_delete_plan, "missing"),
    "ledger directory deleted": (_delete_directory, "directory is missing"),
    "ledger directory renamed": (_rename_directory, "directory is missing"),
}


@pytest.mark.integration
@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
def test_resuming_a_dp_run_whose_ledger_lost_or_altered_entries_is_refused_naming_the_file(interrupted, tmp_path, damage):
    partial = _copy(interrupted, tmp_path)
    ledger = partial / "ledger"
    c = _two_round_client(ledger)
    before = json.loads((ledger / MANIFEST).read_text()) if (ledger / MANIFEST).exists() else None
    apply, why = DAMAGE[damage]
    named = apply(ledger, c)
    with pytest.raises(LedgerIncomplete) as refused:
        resume_federation(partial, RunOptions(progress=False))
    assert named in str(refused.value) and why in str(refused.value)
    assert refused.value.exit_status == 1  # a privacy integrity failure (errors.PrivacyError family)
    # the refusal wrote nothing: the damaged state is left for a human to restore, and the run is not completed
    assert partial.exists() and not partial.with_name(partial.name.removesuffix(".partial")).exists()
    if before is not None and (ledger / MANIFEST).exists():
        assert json.loads((ledger / MANIFEST).read_text()) == before


@pytest.mark.integration
def test_rm_rf_ledger_of_a_partial_run_then_fedrlhf_run_resume_exits_1_naming_the_directory(interrupted, tmp_path, capsys):
    partial = _copy(interrupted, tmp_path)
    shutil.rmtree(partial / "ledger")
    assert cli(["run", "--resume", str(partial)]) == 1
    err = capsys.readouterr().err
    assert f"{partial / 'ledger'}: the privacy ledger directory is missing" in err
    assert "Traceback" not in err
    assert not (partial / "ledger").exists()  # nothing was re-created


@pytest.mark.integration
def test_the_weakened_ledger_accepts_the_deleted_ledger_and_under_reports_epsilon(interrupted, tmp_path, monkeypatch, shared_datasets):
    """Not vacuous: the same `rm -rf ledger/` resumed without the manifest check completes and
    reports a smaller ε from fewer releases than the honest resume of the same interrupted run."""
    honest = resume_federation(_copy(interrupted, tmp_path / "honest"), RunOptions(data_dir=shared_datasets, progress=False))
    true_eps = json.loads((honest / "summary.json").read_text())["privacy"]["epsilon_spent_max"]
    true_releases = sum(len(v) for v in read_ledger(honest / "ledger")[1].values())
    assert cli(["ledger", str(honest)]) == 0  # stored ε = the accountant's recomputation, chains verified

    weak_partial = _copy(interrupted, tmp_path / "weak")
    shutil.rmtree(weak_partial / "ledger")
    _weakened(monkeypatch)
    weak = resume_federation(weak_partial, RunOptions(data_dir=shared_datasets, progress=False))
    weak_eps = json.loads((weak / "summary.json").read_text())["privacy"]["epsilon_spent_max"]
    weak_releases = sum(len(v) for v in read_ledger(weak / "ledger")[1].values())

    print(
        f"\nrm -rf ledger/ then resume: weakened ledger reports ε = {weak_eps:.4f} from {weak_releases} releases; "
        f"true ε = {true_eps:.4f} from {true_releases} releases"
    )
    assert true_releases == 12 and weak_releases == 6  # round 0's six releases are forgotten
    assert 3.0 < true_eps <= 4.0
    assert weak_eps < true_eps - 0.5


# ------------------------------------------------------------------------------ crash between entry and manifest (toy task)

RECORD = {"mode": "record", "epsilon": 4.0, "delta": 1e-2, "max_grad_norm": 1.0, "batch_size": 1, "accountant": "rdp"}


def _toy(**fed):
    raw = toy_config(**{"rounds": 3, "weighting": "uniform", "sparse_rows": "all", **fed})
    raw["task"]["kind"] = "toy-dp"
    raw["privacy"] = RECORD
    return config_from_dict(raw)


def _crash_at_manifest_write(monkeypatch, n: int) -> None:
    """Kill the process on the n-th manifest write, after the client file holds the entry."""
    calls = {"n": 0}
    original = PrivacyLedger._write_manifest_record

    def write(self, client, rows):
        calls["n"] += 1
        if calls["n"] == n:
            raise SimulatedCrash(f"killed between client-{client}.json and {MANIFEST}")
        return original(self, client, rows)

    monkeypatch.setattr(PrivacyLedger, "_write_manifest_record", write)


@pytest.mark.parametrize("n", [1, 6], ids=["first entry of a client", "second entry of a client"])
def test_a_crash_between_an_entry_and_the_manifest_resumes_with_the_entry_counted(tmp_path, monkeypatch, n):
    whole = run_federation(_toy(), RunOptions(out=tmp_path / "whole", progress=False))
    with monkeypatch.context() as m:
        _crash_at_manifest_write(m, n)
        with pytest.raises(SimulatedCrash):
            run_federation(_toy(), RunOptions(out=tmp_path / "crash", progress=False))
    [partial] = list((tmp_path / "crash").glob("*.partial"))
    check = check_ledger(partial / "ledger")
    assert check.ok and len(check.pending) == 1  # one entry on disk that the manifest does not count yet
    [(c, _)] = check.pending.items()
    on_disk = len(check.entries[c])
    assert json.loads((partial / "ledger" / MANIFEST).read_text())["clients"].get(str(c), {"count": 0})["count"] == on_disk - 1

    resumed = resume_federation(partial, RunOptions(progress=False))
    _, after = read_ledger(resumed / "ledger")
    _, reference = read_ledger(whole / "ledger")
    assert {k: [(e.round, e.epsilon_after) for e in v] for k, v in after.items()} == {
        k: [(e.round, e.epsilon_after) for e in v] for k, v in reference.items()
    }
    assert check_ledger(resumed / "ledger").pending == {}  # rolled forward, not dropped


def test_a_file_holding_two_entries_the_manifest_never_counted_is_refused(tmp_path):
    """Only the single in-flight entry of the crash window is rolled forward; an older manifest
    (restored from a backup, say) against newer files is not a crash shape."""
    run = run_federation(_toy(rounds=2), RunOptions(out=tmp_path, progress=False, keep_checkpoint=True))
    ledger = run / "ledger"
    manifest = json.loads((ledger / MANIFEST).read_text())
    del manifest["clients"]["1"]
    (ledger / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(LedgerIncomplete, match=r"client-1\.json: holds 2 entries the manifest never recorded"):
        read_ledger(ledger)


# ------------------------------------------------------------------------------ on a deployment node


def test_a_node_resuming_without_its_ledger_refuses_the_setup_naming_it(tmp_path):
    config = _toy()
    gone = tmp_path / "node" / "privacy" / "run-x" / "ledger"
    host = ParticipantHost([0, 1, 2, 3], None, state_dir=tmp_path / "node", ledger_dir=gone, resume=True)
    req = NodeMessage("setup", {"client_ids": [0, 1, 2, 3]}, blobs={"config": config.to_yaml().encode("utf-8")})
    resp = NodeMessage.decode(host.handle(req.encode(REQUEST)), RESPONSE)
    assert resp.header["error"].startswith("LedgerIncomplete: ")
    assert f"{gone}: the privacy ledger directory is missing" in resp.header["error"]
    assert not gone.exists()


def test_a_node_resuming_with_its_ledger_whole_keeps_the_spend(tmp_path):
    config = _toy()
    ledger = tmp_path / "node" / "ledger"
    first = factory.build_client_privacy(config, {c: c + 1 for c in range(4)}, ledger, False, engine.build_aggregator(config, [0, 1, 2, 3]))
    first.ledger.record(LedgerEntry(2, 0, "dp-sgd", 1.3, 1 / 3, 3, 1.0, 0.7, 1e-2, "d" * 64))
    host = ParticipantHost([0, 1, 2, 3], None, state_dir=tmp_path / "node", ledger_dir=ledger, resume=True)
    req = NodeMessage("setup", {"client_ids": [0, 1, 2, 3]}, blobs={"config": config.to_yaml().encode("utf-8")})
    resp = NodeMessage.decode(host.handle(req.encode(REQUEST)), RESPONSE)
    assert "error" not in resp.header
    assert host.privacy.spent(2) == 0.7 and host.privacy.spent(0) == 0.0


# ------------------------------------------------------------------------------ several writers of one ledger


def test_two_processes_sharing_a_ledger_never_drop_each_others_manifest_records(tmp_path):
    """Worker processes of one run each hold their own PrivacyLedger over the same directory: every
    commit re-reads the manifest under the lock, so interleaved commits keep every client's record."""
    PrivacyLedger(tmp_path / "ledger", {"mode": "record"}, resume=False)
    a = PrivacyLedger(tmp_path / "ledger", {"mode": "record"}, resume=True)
    b = PrivacyLedger(tmp_path / "ledger", {"mode": "record"}, resume=True)
    for r in range(3):
        a.record(LedgerEntry(0, r, "dp-sgd", 1.0, 0.5, 2, 1.0, 0.1 * (r + 1), 1e-5, f"a{r}".ljust(64, "0")))
        b.record(LedgerEntry(1, r, "dp-sgd", 1.0, 0.5, 2, 1.0, 0.1 * (r + 1), 1e-5, f"b{r}".ljust(64, "0")))
    check = check_ledger(tmp_path / "ledger")
    assert check.ok and check.pending == {}
    assert {c: rec["count"] for c, rec in check.manifest["clients"].items()} == {"0": 3, "1": 3}


def test_a_two_worker_dp_run_leaves_a_manifest_that_counts_every_release(tmp_path):
    run = run_federation(_toy(workers=2), RunOptions(out=tmp_path, progress=False))
    check = check_ledger(run / "ledger")
    assert check.ok and check.pending == {}
    assert {c: rec["count"] for c, rec in check.manifest["clients"].items()} == {str(c): 3 for c in range(4)}


# ------------------------------------------------------------------------------ a ledger rolled back as a whole


def _interrupted_with_backup(tmp_path: Path) -> tuple[Path, Path]:
    """A toy record-level run (4 clients, 3 rounds) killed after 10 commits (rounds 0 and 1 checkpointed),
    and a copy of its ledger taken after round 0 (4 commits): consistent with itself, but older."""
    out, backup = tmp_path / "run", tmp_path / "ledger-after-round-0"
    count = 0

    def on_commit(client: int, round: int) -> None:
        nonlocal count
        count += 1
        if count == 4:
            [partial] = list(out.glob("*.partial"))
            shutil.copytree(partial / "ledger", backup)
        if count == 10:
            raise SimulatedCrash("killed after 10 commits")

    with pytest.raises(SimulatedCrash):
        run_federation(_toy(), RunOptions(out=out, progress=False, on_commit=on_commit))
    [partial] = list(out.glob("*.partial"))
    assert json.loads((partial / "checkpoint" / "state.json").read_text())["completed_round"] == 1
    return partial, backup


def test_resuming_with_an_older_copy_of_the_ledger_is_refused_as_a_rollback(tmp_path):
    partial, backup = _interrupted_with_backup(tmp_path)
    assert check_ledger(backup).ok  # the older copy passes its own manifest check
    shutil.rmtree(partial / "ledger")
    shutil.copytree(backup, partial / "ledger")
    with pytest.raises(LedgerIncomplete, match=r"client-0\.json: holds 1 entries, but .*state\.json was taken when client 0 had 2"):
        resume_federation(partial, RunOptions(progress=False))


def test_resuming_with_a_fresh_empty_ledger_in_place_is_refused_as_a_rollback(tmp_path):
    partial, _ = _interrupted_with_backup(tmp_path)
    shutil.rmtree(partial / "ledger")
    PrivacyLedger(partial / "ledger", factory.ledger_header(_toy()), resume=False)  # a valid, empty ledger for the same plan
    with pytest.raises(LedgerIncomplete, match=r"client-3\.json: holds 0 entries, but .*when client 3 had 2.*rolled back"):
        resume_federation(partial, RunOptions(progress=False))
    # the same ledger without the checkpoint's record of it is what the weakened check accepts
    assert check_ledger(partial / "ledger").ok
