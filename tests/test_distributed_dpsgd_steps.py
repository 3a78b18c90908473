"""Several distributed DP-SGD steps per round (``privacy.steps_per_round: S``).

One round is S aggregations, each a noised sum of the clients' per-record clipped gradients taken
at the model the previous step's release made. What is checked, on 6 u1 clients of the tiny config:

* a round of S steps is exactly S one-step rounds (same releases, each applied before the next
  step's gradients are taken): with the noise switched off, ``rounds=1, S=2`` and ``rounds=2, S=1``
  end in the same model; taking both steps' gradients at the round's starting model does not;
* plain aggregation with central noise and SecAgg with Skellam shares give the same model within
  the masking quantisation (noise off), and each step under SecAgg is its own aggregation;
* the ledger holds rounds × S entries per client, with ε composed over all of them, equal to
  ``dp_accounting``'s PLD for rounds × S Gaussian releases (replace-one);
* a run killed in the middle of a round's second step resumes at that step and ends in the
  uninterrupted run's ledger and model;
* a bad ``steps_per_round`` exits 2 naming the key.

Runs are compared model to model, so the simulated humans' per-record noise, keyed by a fresh
secret per client and run (:func:`fedrlhf_secure.privacy.randomness.secret_key`), gets one fixed
key per client here (:func:`fixed_human_keys`), and the DP noise is switched off where models are compared.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from broken_noise import SilentNoise
from crash_points import SimulatedCrash, crash_after
from dp_accounting.pld import pld_privacy_accountant

from fedrlhf_secure.config import load_config
from fedrlhf_secure.federation.engine import RunOptions, resume_federation, run_federation
from fedrlhf_secure.privacy.ledger import read_ledger
from fedrlhf_secure.rundir import load_tensors

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "movielens-tiny.yaml"

BASE = [
    "task.num_clients=6",
    "federation.weighting=uniform",
    "federation.server_optimizer.kind=sgd",
    "federation.server_lr=0.05",
    "privacy.mode=record",
    "privacy.epsilon=8",
    "privacy.delta=1e-5",
    "privacy.max_grad_norm=0.5",
]
PLAIN = ["aggregation.kind=plain", "privacy.record_noise=central"]
SECAGG = [
    "aggregation.kind=secagg",
    "privacy.record_noise=distributed",
    "aggregation.clip_range=64",
    "aggregation.max_weight=1",
    "aggregation.bits=64",
    "aggregation.noise_bound=8000000",
]


@pytest.fixture(autouse=True)
def fixed_human_keys(monkeypatch):
    """The same simulated humans in every run of a test (a test-only substitution of the secret key)."""
    from fedrlhf_secure.tasks.movielens import task as movielens_task

    monkeypatch.setattr(movielens_task, "secret_key", lambda: b"\x07" * 32)


def _run(tmp_path, name, data, overrides, noise=None, **kw):
    config = load_config(TINY, BASE + overrides)
    return run_federation(config, RunOptions(data_dir=data, out=tmp_path / name, progress=False, noise=noise, **kw))


def _model(run: Path) -> dict[str, np.ndarray]:
    return load_tensors(run / "model.safetensors")


def _max_diff(a, b) -> float:
    return max(float(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max()) for k in a)


def _spend(run: Path):
    _, entries = read_ledger(run / "ledger")
    return {c: [(e.round, e.mechanism, round(e.epsilon_after, 9), e.steps) for e in es] for c, es in entries.items()}


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_round_of_two_steps_is_two_one_step_rounds_and_applies_each_step_before_the_next(tmp_path, shared_datasets, monkeypatch):
    stepped = _run(tmp_path, "stepped", shared_datasets, [*PLAIN, "federation.rounds=1", "privacy.steps_per_round=2"], SilentNoise())
    rounds = _run(tmp_path, "rounds", shared_datasets, [*PLAIN, "federation.rounds=2", "privacy.steps_per_round=1"], SilentNoise())
    initial = _run(tmp_path, "one", shared_datasets, [*PLAIN, "federation.rounds=1", "privacy.steps_per_round=1"], SilentNoise())
    a, b, first = _model(stepped), _model(rounds), _model(initial)
    moved = _max_diff(a, first)
    assert moved > 1e-4  # the second step moved the model
    assert _max_diff(a, b) <= 1e-6 * max(1.0, moved)
    [row] = _rows(stepped)
    assert (row["steps"], row["aggregations"], row["round"]) == (2, 2, 0)
    # both runs made two releases per client at the same z, so the same ε
    assert _spend(stepped) == _spend(rounds)

    # the weakened round: both steps' gradients taken at the round's starting model (the server
    # applies nothing between them) ends elsewhere, so the equality above is not automatic
    from fedrlhf_secure.federation import round_core

    real = round_core.RoundCore._release

    def late(self, t, outcome, admitted):
        saved = {k: v.copy() for k, v in self.global_params.items()}
        out = real(self, t, outcome, admitted)
        if t % 2 == 0:  # step 0: remember the update, but let step 1 see the old model
            self._pending = {k: self.global_params[k] - saved[k] for k in saved}
            self.global_params = saved
        else:
            self.global_params = {k: v + self._pending[k] for k, v in self.global_params.items()}
        return out

    monkeypatch.setattr(round_core.RoundCore, "_release", late)
    weak = _run(tmp_path, "weak", shared_datasets, [*PLAIN, "federation.rounds=1", "privacy.steps_per_round=2"], SilentNoise())
    assert _max_diff(_model(weak), a) > 1e-5


def test_secagg_steps_release_the_same_sums_as_plain_within_quantisation(tmp_path, shared_datasets):
    steps = ["federation.rounds=1", "privacy.steps_per_round=2"]
    plain = _run(tmp_path, "plain", shared_datasets, [*PLAIN, *steps], SilentNoise())
    secagg = _run(tmp_path, "secagg", shared_datasets, [*SECAGG, *steps], SilentNoise())
    first = _run(tmp_path, "one", shared_datasets, [*PLAIN, "federation.rounds=1", "privacy.steps_per_round=1"], SilentNoise())
    a, b = _model(plain), _model(secagg)
    moved = _max_diff(a, _model(first))
    diff = _max_diff(a, b)
    assert diff <= 1e-3 * moved  # quantised to the masking scale, nothing else
    [row] = _rows(secagg)
    assert (row["steps"], row["aggregations"]) == (2, 2)
    assert row["transport_stages"] >= 2 * 3  # each step ran the masking protocol's stages itself
    spend = _spend(secagg)
    assert all([r[0] for r in rows] == [0, 1] and {r[1] for r in rows} == {"skellam"} for rows in spend.values())


def test_ledger_holds_rounds_times_steps_entries_and_epsilon_matches_dp_accounting(tmp_path, shared_datasets):
    run = _run(tmp_path, "run", shared_datasets, [*PLAIN, "federation.rounds=2", "privacy.steps_per_round=3"])
    header, entries = read_ledger(run / "ledger")
    assert header["steps_per_round"] == 3 and header["rounds"] == 2
    assert len(entries) == 6
    for rows in entries.values():
        assert [e.round for e in rows] == list(range(6))
        assert {e.mechanism for e in rows} == {"gaussian"} and {e.steps for e in rows} == {1}
    z = {e.noise_multiplier for rows in entries.values() for e in rows}
    assert len(z) == 1
    acc = pld_privacy_accountant.PLDAccountant(dp_accounting.NeighboringRelation.REPLACE_ONE)
    acc.compose(dp_accounting.GaussianDpEvent(z.pop()), 6)
    ref = float(acc.get_epsilon(1e-5))
    last = max(rows[-1].epsilon_after for rows in entries.values())
    assert ref - 0.005 <= last <= ref + 0.03
    assert 7.9 <= ref <= 8.0  # z was calibrated for 6 releases, not 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["privacy"]["steps_per_round"] == 3
    assert [(r["round"], r["aggregations"]) for r in _rows(run)] == [(0, 3), (1, 3)]


def test_a_run_killed_inside_a_rounds_second_step_resumes_there_with_its_ledger(tmp_path, shared_datasets):
    overrides = [*PLAIN, "federation.rounds=2", "privacy.steps_per_round=3"]
    whole = _run(tmp_path, "whole", shared_datasets, overrides, SilentNoise())
    # 6 clients: commits 1-6 are step 0 of round 0, the 9th is inside step 1
    with pytest.raises(SimulatedCrash):
        _run(tmp_path, "crash", shared_datasets, overrides, SilentNoise(), on_commit=crash_after(9))
    [partial] = list((tmp_path / "crash").glob("*.partial"))
    state = json.loads((partial / "checkpoint" / "state.json").read_text())
    assert (state["completed_round"], state["round_steps_done"]) == (-1, 1)
    before = _spend(partial)
    assert sum(len(v) for v in before.values()) == 9
    resumed = resume_federation(partial, RunOptions(data_dir=shared_datasets, progress=False, noise=SilentNoise()))
    after = _spend(resumed)
    assert after == _spend(whole)
    assert sum(len(v) for v in after.values()) == 6 * 2 * 3
    for c, rows in before.items():
        assert after[c][: len(rows)] == rows
    assert _max_diff(_model(resumed), _model(whole)) <= 1e-6  # resumed at step 1 from step 0's model
    assert [r["aggregations"] for r in _rows(resumed)] == [3, 3]


@pytest.mark.parametrize(
    "overrides",
    [
        ["privacy.mode=record", "privacy.epsilon=8", "privacy.record_noise=central", "privacy.steps_per_round=0"],
        ["privacy.mode=record", "privacy.epsilon=8", "privacy.record_noise=central", "privacy.steps_per_round=two"],
        ["privacy.mode=client", "privacy.epsilon=8", "privacy.steps_per_round=2"],
        ["privacy.mode=record", "privacy.epsilon=8", "privacy.steps_per_round=2"],  # local Opacus DP-SGD has no steps
    ],
)
def test_a_bad_steps_per_round_exits_2_naming_the_key(tmp_path, overrides):
    cmd = [sys.executable, "-m", "fedrlhf_secure.cli", "run", str(TINY), "--out", str(tmp_path), "--no-progress"]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "privacy.steps_per_round" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())


def test_the_utility_grids_distributed_variant_puts_the_noise_where_each_aggregator_protects_it():
    from fedrlhf_secure.bench.dp import _run_overrides

    plain = load_config(ROOT / "configs" / "movielens.yaml", _run_overrides("record-distributed", 8.0, "plain", 1e-5))
    secagg = load_config(ROOT / "configs" / "movielens.yaml", _run_overrides("record-distributed", 8.0, "secagg", 1e-5))
    assert (plain.privacy.record_noise, plain.privacy.steps_per_round, plain.federation.rounds) == ("central", 2, 5)
    assert (secagg.privacy.record_noise, secagg.privacy.steps_per_round) == ("distributed", 2)
    assert plain.federation.weighting == "uniform" and plain.federation.server_optimizer.kind == "adam"
