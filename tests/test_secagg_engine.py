"""The federation engine with ``aggregation.kind: secagg`` gives the same model as plain FedAvg."""

from __future__ import annotations

import json

import numpy as np
import pytest
from toy_task import toy_config

from fedrlhf_secure.config import config_from_dict
from fedrlhf_secure.federation.engine import RunOptions, run_federation
from fedrlhf_secure.rundir import load_tensors


def _run(tmp_path, aggregation: dict, clients: int = 10, **fed):
    raw = toy_config(rounds=2, **fed)
    raw["task"]["clients"] = clients
    raw["aggregation"] = aggregation
    return run_federation(config_from_dict(raw), RunOptions(out=tmp_path, progress=False))


def _model(tmp_path, aggregation: dict, clients: int = 10, **fed):
    return load_tensors(_run(tmp_path, aggregation, clients, **fed) / "model.safetensors")


def test_engine_with_secagg_matches_plain_fedavg(tmp_path):
    plain = _model(tmp_path / "plain", {"kind": "plain"})
    masked = _model(tmp_path / "secagg", {"kind": "secagg", "clip_range": 64.0, "neighbours": 6})
    for name in plain:
        np.testing.assert_allclose(masked[name], plain[name], atol=1e-4)


def test_engine_with_secagg_survives_simulated_dropouts(tmp_path):
    run = _run(tmp_path, {"kind": "secagg", "clip_range": 64.0}, clients=16, dropout_rate=0.15)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["clients_dropped"] for r in rows) > 0
    assert all(r["clients_aggregated"] + r["clients_dropped"] == 16 for r in rows)
    w = load_tensors(run / "model.safetensors")["w"]
    assert np.all(np.isfinite(w)) and np.abs(w).max() > 0.1


def test_engine_refuses_a_secagg_config_that_could_wrap(tmp_path):
    with pytest.raises(ValueError, match="could wrap"):
        _model(tmp_path, {"kind": "secagg", "bits": 32, "levels": 1 << 24, "max_weight": 1000.0})
