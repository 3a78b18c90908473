"""The federation engine in CKKS mode reaches the same model as plain FedAvg, up to the flooding noise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from toy_task import toy_config

from aggregation import wire
from aggregation.ckks import CKKSConfig, factory
from fedrlhf_secure.config import config_from_dict, load_config
from fedrlhf_secure.federation.engine import RunOptions, run_federation
from fedrlhf_secure.rundir import load_tensors

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _model(tmp_path, kind: str, hook=None):
    raw = toy_config(rounds=2)
    raw["aggregation"] = {"kind": kind}
    run = run_federation(config_from_dict(raw), RunOptions(out=tmp_path / kind, progress=False, hook=hook))
    return load_tensors(run / "model.safetensors")


def test_ckks_federation_matches_plain_fedavg_within_the_flooding_noise_and_the_server_sees_only_ckks_frames(tmp_path):
    kinds: set[str] = set()
    enc = _model(tmp_path, "ckks", hook=lambda s, d, b: kinds.add(wire.decode(b).kind) if d == -1 else None)
    plain = _model(tmp_path, "plain")
    assert set(enc) == set(plain)
    # the toy's clients weigh 1..4, so an average divides the summed noise by at least 1; over 2 rounds
    # with at most 64 coordinates the error stays under 2 x 6 sigma
    sigma = factory(CKKSConfig(), range(4), 0).plan.flood_sigma(4, 64)
    worst = max(float(np.max(np.abs(enc[n] - plain[n]))) for n in plain)
    assert worst < 12 * sigma
    assert worst > 0  # the flooding noise is there
    assert "ckks/update" in kinds and "plain/update" not in kinds and "ckks/mask" in kinds


@pytest.mark.integration
def test_movielens_tiny_under_ckks_keeps_the_plain_accuracy(shared_datasets, tmp_path):
    if not (shared_datasets / "ml-100k" / "u.data").is_file():
        pytest.skip(f"MovieLens 100K not found in {shared_datasets / 'ml-100k'}")
    acc = {}
    for kind in ("plain", "ckks"):
        config = load_config(CONFIGS / "movielens-tiny.yaml", [f"aggregation.kind={kind}"])
        run = run_federation(config, RunOptions(data_dir=shared_datasets, out=tmp_path / kind, progress=False))
        acc[kind] = json.loads((run / "summary.json").read_text())["final"]["heldout_accuracy"]
    assert abs(acc["ckks"] - acc["plain"]) <= 0.005, acc
