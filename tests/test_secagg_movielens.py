"""MovieLens u1 (the real ML-100K files) with masking: held-out accuracy as with plain FedAvg,
within quantisation, round by round — the consistency round and signatures change no number."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedrlhf_secure.config import load_config
from fedrlhf_secure.federation.engine import RunOptions, run_federation

TINY = Path(__file__).resolve().parents[1] / "configs" / "movielens-tiny.yaml"


@pytest.mark.integration
def test_movielens_u1_heldout_accuracy_under_secagg_equals_plain_fedavg(shared_datasets, tmp_path):
    if not (shared_datasets / "ml-100k" / "u.data").is_file():
        pytest.skip(f"MovieLens 100K not found in {shared_datasets / 'ml-100k'}")
    rows = {}
    for kind in ("plain", "secagg"):
        cfg = load_config(TINY, [f"aggregation.kind={kind}", "federation.rounds=5"])
        run = run_federation(cfg, RunOptions(data_dir=shared_datasets, out=tmp_path / kind, progress=False))
        rows[kind] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows["plain"]) == len(rows["secagg"]) == 5
    for p, s in zip(rows["plain"], rows["secagg"], strict=True):
        assert s["clients_aggregated"] == p["clients_aggregated"] == 40
        # stochastic rounding moves the average by < 1e-4 per coordinate: at most a rating or two flips
        assert s["heldout_accuracy"] == pytest.approx(p["heldout_accuracy"], abs=2e-3)
    print({k: [round(r["heldout_accuracy"], 5) for r in v] for k, v in rows.items()})
