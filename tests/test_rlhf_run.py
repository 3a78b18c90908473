"""kind: rlhf through the engine (tiny model, generated IMDb data): the FFA-LoRA B vector is an update
like any other — masked, encrypted, clipped and noised by the one participant pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
from imdb_fixtures import write_imdb_parquet
from test_rlhf_task import imdb_task_mapping

from fedrlhf_secure.config import config_from_dict
from fedrlhf_secure.federation.engine import RunOptions, run_federation
from fedrlhf_secure.rundir import load_tensors


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDRLHF_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize(
    "aggregation,privacy",
    [
        # two clients cannot hold the default colluder/dropout bounds (one colluder would be the other
        # client): this test is about the LoRA vector's path, so it states none
        ({"kind": "secagg", "colluders": 0.0, "dropouts": 0.0}, {"mode": "none"}),
        ({"kind": "ckks", "masking": {"colluders": 0.0, "dropouts": 0.0}}, {"mode": "none"}),
        ({"kind": "plain"}, {"mode": "client", "noise_multiplier": 0.5, "clip_norm": 0.1}),
        ({"kind": "plain"}, {"mode": "record", "noise_multiplier": 1.0, "batch_size": 10}),
    ],
    ids=["secagg", "ckks", "client-dp", "record-dp"],
)
def test_the_ffa_lora_vector_goes_through_every_aggregation_and_privacy_mode(tmp_path, cache_dir, aggregation, privacy):
    data = write_imdb_parquet(tmp_path / "data", n_train=300, n_test=200)
    raw = {
        "seed": 1,
        "task": imdb_task_mapping(),
        "federation": {"rounds": 1, "local_epochs": 1, "min_clients": 2, "weighting": "uniform"},
        "aggregation": aggregation,
        "privacy": privacy,
    }
    run = run_federation(config_from_dict(raw), RunOptions(data_dir=data, out=tmp_path / "runs", progress=False))
    (row,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert row["clients_aggregated"] == 2
    assert 0.0 <= row["positive_rate_mean"] <= 1.0
    model = load_tensors(run / "model.safetensors")
    assert model and all(".lora_B." in k for k in model)  # only B is federated (FFA-LoRA)
    assert any(np.abs(v).max() > 0 for v in model.values())
