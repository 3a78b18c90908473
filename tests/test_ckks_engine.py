"""The federation engine in CKKS mode reaches the same model as plain FedAvg."""

from __future__ import annotations

import pytest
from toy_task import toy_config

from aggregation import wire
from fedrlhf_secure.config import config_from_dict
from fedrlhf_secure.federation.engine import RunOptions, run_federation
from fedrlhf_secure.rundir import load_tensors


def _model(tmp_path, kind: str, hook=None):
    raw = toy_config(rounds=2)
    raw["aggregation"] = {"kind": kind}
    run = run_federation(config_from_dict(raw), RunOptions(out=tmp_path / kind, progress=False, hook=hook))
    return load_tensors(run / "model.safetensors")


def test_ckks_federation_matches_plain_fedavg_and_the_server_sees_only_ckks_frames(tmp_path):
    kinds: set[str] = set()
    enc = _model(tmp_path, "ckks", hook=lambda s, d, b: kinds.add(wire.decode(b).kind) if d == -1 else None)
    plain = _model(tmp_path, "plain")
    assert set(enc) == set(plain)
    for name in plain:
        assert enc[name] == pytest.approx(plain[name], rel=1e-4, abs=1e-6)
    assert "ckks/update" in kinds and "plain/update" not in kinds
