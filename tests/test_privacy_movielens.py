"""Record-level DP-SGD on the real MovieLens data: the ledger after a crash and resume, and what the task reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from crash_points import SimulatedCrash, crash_after

from fedrlhf_secure.config import load_config
from fedrlhf_secure.federation.engine import RunOptions, resume_federation, run_federation
from fedrlhf_secure.privacy.ledger import read_ledger

TINY = Path(__file__).resolve().parents[1] / "configs" / "movielens-tiny.yaml"
OVERRIDES = [
    "task.num_clients=6",
    "federation.rounds=2",
    "privacy.mode=record",
    "privacy.epsilon=4",
    "privacy.delta=1e-5",
    "privacy.accountant=rdp",
]


def _spend(run: Path) -> dict[int, list[tuple[int, float, int, str]]]:
    _, entries = read_ledger(run / "ledger")
    return {c: [(e.round, round(e.epsilon_after, 9), e.steps, e.digest) for e in es] for c, es in entries.items()}


@pytest.mark.slow
def test_movielens_dp_sgd_run_killed_mid_round_resumes_to_the_uninterrupted_ledger(tmp_path, shared_datasets):
    config = load_config(TINY, OVERRIDES)
    whole = run_federation(config, RunOptions(data_dir=shared_datasets, out=tmp_path / "whole", progress=False))
    with pytest.raises(SimulatedCrash):
        run_federation(config, RunOptions(data_dir=shared_datasets, out=tmp_path / "crash", progress=False, on_commit=crash_after(9)))
    [partial] = list((tmp_path / "crash").glob("*.partial"))
    before = _spend(partial)
    resumed = resume_federation(partial, RunOptions(data_dir=shared_datasets, progress=False))
    after, reference = _spend(resumed), _spend(whole)
    strip = lambda spend: {c: [row[:3] for row in rows] for c, rows in spend.items()}
    assert strip(after) == strip(reference)
    assert sum(len(v) for v in after.values()) == 12
    for c, rows in before.items():
        assert after[c][: len(rows)] == rows
    summary = json.loads((resumed / "summary.json").read_text())["privacy"]
    assert 3.0 < summary["epsilon_spent_max"] <= 4.0
    # every release is a real DP-SGD fit: Opacus steps = local_epochs x batches per epoch, as planned
    for rows in after.values():
        assert all(steps >= 1 for _, _, steps, _ in rows)
