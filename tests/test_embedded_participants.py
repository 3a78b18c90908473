"""The embedded run's participant hosts: worker processes, simulated dropouts, and CKKS with DP.

Each test here is a defect an adversarial review of the round-core rewrite reproduced; they pin
down that the embedded simulation behaves like one machine running every client, whatever the
number of worker processes, and that a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
from broken_noise import SilentNoise
from crash_points import SimulatedCrash, crash_after
from toy_task import toy_config

from fedrlhf_secure.config import config_from_dict
from fedrlhf_secure.configtypes import ConfigError
from fedrlhf_secure.errors import InputError
from fedrlhf_secure.federation.engine import RunOptions, resume_federation, run_federation
from fedrlhf_secure.privacy.ledger import read_ledger
from fedrlhf_secure.rundir import load_tensors

CLIENT = {"mode": "client", "epsilon": 4.0, "delta": 1e-3, "clip_norm": 1.0, "noise": "distributed"}
RECORD = {"mode": "record", "epsilon": 4.0, "delta": 1e-2, "max_grad_norm": 1.0, "batch_size": 1, "accountant": "rdp"}


def _config(privacy=None, aggregation=None, **fed):
    raw = toy_config(**{"rounds": 3, "weighting": "uniform", "sparse_rows": "all", **fed})
    raw["task"]["kind"] = "toy-dp"
    if privacy:
        raw["privacy"] = privacy
    if aggregation:
        raw["aggregation"] = aggregation
    return config_from_dict(raw)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _ledger(run: Path) -> dict[int, list[tuple[int, float]]]:
    _, entries = read_ledger(run / "ledger")
    return {c: [(e.round, round(e.epsilon_after, 9)) for e in es] for c, es in entries.items()}


def _model(run: Path) -> dict[str, np.ndarray]:
    return load_tensors(run / "model.safetensors")


def test_central_noise_under_ckks_is_refused_because_nobody_could_add_it(tmp_path):
    """The server cannot read a CKKS aggregate, so it cannot add central noise; before this was refused
    the clients sent un-noised updates while the ledger charged ε for noise nobody added."""
    with pytest.raises(ConfigError, match="privacy.noise: 'central' noise is added to the aggregate by the server"):
        run_federation(_config({**CLIENT, "noise": "central"}, {"kind": "ckks"}), RunOptions(out=tmp_path, progress=False))
    assert list(tmp_path.iterdir()) == []


def test_ckks_hosts_discard_an_aggregate_with_fewer_contributors_than_the_noise_was_sized_for(tmp_path):
    """Under CKKS only the hosts read the aggregate, so they enforce the survivors rule themselves:
    the same rounds abort as under plain aggregation, where the server's half enforces it."""
    privacy = {**CLIENT, "survivor_fraction": 0.5}
    runs = {
        kind: run_federation(
            _config(privacy, {"kind": kind}, rounds=5, dropout_rate=0.5, min_clients=4),
            RunOptions(out=tmp_path / kind, progress=False, noise=SilentNoise()),
        )
        for kind in ("plain", "ckks")
    }
    aborted = {kind: [r["round"] for r in _rows(run) if r["aggregation_aborted"]] for kind, run in runs.items()}
    assert aborted["plain"] and set(aborted["plain"]) <= set(aborted["ckks"])
    # CKKS sums its masks with SecAgg+ (issue 12), whose stages see the simulated dropouts that plain's
    # one stage does not: its other aborts are the mask round's own (too few to unmask, nothing revealed)
    reasons = [r["aggregation_aborted"] for r in _rows(runs["ckks"]) if r["aggregation_aborted"]]
    assert any("sized for 4" in a for a in reasons)
    assert all("sized for 4" in a or "nothing revealed" in a for a in reasons)


@pytest.mark.timeout(120)
def test_ckks_over_two_worker_processes_equals_one_process(tmp_path):
    """The simulated dealer's keys are dealt before the workers fork, so every process holds the same
    keys (lazily, each worker dealt its own and every round aborted while ε was spent), and a forked
    worker never destroys a TenSEAL context its parent made."""
    # a key per round: the workers load more contexts than the memo cache holds, so it evicts the ones
    # the parent (which ran the one-process run first) left in it; destroying those in a forked child hung
    ckks = {"kind": "ckks", "rotate_keys": "round"}
    one = run_federation(_config(CLIENT, ckks), RunOptions(out=tmp_path / "w1", progress=False, noise=SilentNoise()))
    two = run_federation(_config(CLIENT, ckks, workers=2), RunOptions(out=tmp_path / "w2", progress=False, noise=SilentNoise()))
    assert [r["clients_aggregated"] for r in _rows(two)] == [4, 4, 4]
    # each run adds its own CKKS flooding noise (keyed by its own key): 3 rounds x 2 runs x 6 sigma apart at most
    from aggregation.ckks import CKKSConfig, factory

    sigma = factory(CKKSConfig(), range(4), 0).plan.flood_sigma(4, 64)
    for k, w in _model(one).items():
        np.testing.assert_allclose(_model(two)[k], w, atol=36 * sigma)
        assert np.abs(w).max() > 0.1  # the model moved
    assert _ledger(two) == _ledger(one)


def test_two_workers_open_one_ledger_instead_of_racing_to_create_it(tmp_path, monkeypatch):
    """The ledger's plan is created by the embedded run before its workers fork; two workers each
    creating it raced, and the later one refused the run ('already holds a ledger'). The worker that
    holds client 1 is made 0.2 s late (as a worker loading more data is), so the race is certain."""
    import time

    from fedrlhf_secure.federation import participant

    real = participant.build_client_privacy

    def late_for_client_1(config, sizes, *args, **kwargs):
        if 1 in sizes:
            time.sleep(0.2)
        return real(config, sizes, *args, **kwargs)

    monkeypatch.setattr(participant, "build_client_privacy", late_for_client_1)
    one = run_federation(_config(RECORD), RunOptions(out=tmp_path / "w1", progress=False))
    two = run_federation(_config(RECORD, workers=2), RunOptions(out=tmp_path / "w2", progress=False))
    assert _ledger(two) == _ledger(one)


def test_a_resumed_run_repeats_the_simulated_dropouts_of_the_uninterrupted_one(tmp_path):
    config = _config({**CLIENT, "survivor_fraction": 0.25}, rounds=4, dropout_rate=0.5, min_clients=1)
    straight = run_federation(config, RunOptions(out=tmp_path / "a", progress=False, noise=SilentNoise()))
    with pytest.raises(SimulatedCrash):
        run_federation(config, RunOptions(out=tmp_path / "b", progress=False, noise=SilentNoise(), on_commit=crash_after(6)))
    (partial,) = (tmp_path / "b").glob("*.partial")
    resumed = resume_federation(partial, RunOptions(progress=False, noise=SilentNoise()))
    counts = [r["clients_aggregated"] for r in _rows(straight)]
    assert counts == [r["clients_aggregated"] for r in _rows(resumed)] and min(counts) < 4  # some clients did drop
    for k, w in _model(straight).items():
        np.testing.assert_array_equal(_model(resumed)[k], w)


def test_a_worker_refusing_bad_input_exits_as_bad_input_and_leaves_no_process_or_directory(tmp_path):
    """A worker's error keeps its family (InputError: exit 2, not a generic failure), and the worker
    processes of a run refused before its first round are stopped."""
    before = len(mp.active_children())
    with pytest.raises(InputError, match="privacy.delta"):
        run_federation(_config({**RECORD, "delta": 0.5}, workers=2), RunOptions(out=tmp_path, progress=False))
    assert len(mp.active_children()) == before
    assert list(tmp_path.iterdir()) == []


def _to_pre_rewrite_layout(partial: Path) -> None:
    """Rewrite a checkpoint and release store as the engine before the participant rewrite wrote them."""
    from safetensors.numpy import load_file, save_file

    ck = partial / "checkpoint"
    clients = load_file(str(ck / "clients.safetensors"))
    save_file(
        {k[len("personal/") :]: v for k, v in clients.items() if k.startswith("personal/")} or {"_empty": np.zeros(1, np.float32)},
        str(ck / "personal.safetensors"),
    )
    (ck / "clients.safetensors").unlink()
    state = json.loads((ck / "state.json").read_text())
    state.pop("model_round")
    (ck / "state.json").write_text(json.dumps(state))
    for path in (ck / "privacy-releases").glob("client-*.safetensors"):
        t = load_file(str(path))
        if "integer_noise" in t:
            t["kw/integer_noise"] = t.pop("integer_noise")
        save_file(t, str(path))


def test_a_run_interrupted_before_the_rewrite_resumes_with_its_ledger_intact(tmp_path):
    """Upgrading must not strand an interrupted run: the old checkpoint layout and the old release-store
    key of the integer noise share are read, so the resumed round replays the same release (same
    digest: no LedgerConflict) and the run ends as an uninterrupted one."""
    config = _config(CLIENT, {"kind": "secagg", "noise_bound": 16_000_000})
    straight = run_federation(config, RunOptions(out=tmp_path / "a", progress=False, noise=SilentNoise()))
    with pytest.raises(SimulatedCrash):
        run_federation(config, RunOptions(out=tmp_path / "b", progress=False, noise=SilentNoise(), on_commit=crash_after(6)))
    (partial,) = (tmp_path / "b").glob("*.partial")
    _to_pre_rewrite_layout(partial)
    resumed = resume_federation(partial, RunOptions(progress=False, noise=SilentNoise()))
    assert _ledger(resumed) == _ledger(straight)
    for k, w in _model(straight).items():
        np.testing.assert_allclose(_model(resumed)[k], w, atol=1e-4)  # masking's stochastic rounding
