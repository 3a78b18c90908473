"""IMDb FedRLHF through the engine: the tiny config on the real data, and every aggregation mode on generated data."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import numpy as np
import pytest
from imdb_fixtures import tiny_task_mapping, write_imdb_parquet

from fedrlhf_secure.cli import main
from fedrlhf_secure.config import config_from_dict
from fedrlhf_secure.federation.engine import RunOptions, run_federation
from fedrlhf_secure.rundir import load_tensors

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDRLHF_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tiny_config_runs_end_to_end_on_the_real_imdb_data(shared_datasets, cache_dir, tmp_path, capsys):
    rc = main(
        [
            "run",
            str(REPO / "configs" / "imdb-tiny.yaml"),
            "--data-dir",
            str(shared_datasets),
            "--out",
            str(tmp_path / "runs"),
            "--no-progress",
        ]
    )
    assert rc == 0
    run = next(p for p in (tmp_path / "runs").iterdir() if p.name.startswith("imdb") and p.is_dir() and not p.is_symlink())
    rows = _rows(run)
    assert [r["round"] for r in rows] == [0, 1]
    for r in rows:
        assert 0.0 <= r["positive_rate_mean"] <= 1.0
        assert r["generations_mean"] == 8.0
        assert np.isfinite(r["kl_to_initial_mean"])
        assert {"shaped_reward_client0_mean", "shaped_reward_client1_mean"} <= set(r)
    summary = json.loads((run / "summary.json").read_text())
    base = summary["baselines"]["initial_policy"]
    assert base["generations"] == 16 and 0.0 <= base["positive_rate"] <= 1.0
    assert base["pretrain_heldout_perplexity"] < base["pretrain_heldout_perplexity_before"]
    model = load_tensors(run / "model.safetensors")
    assert model and all("lora_" in k for k in model)
    assert any(np.abs(v).max() > 0 for k, v in model.items() if ".lora_B." in k)  # the aggregate moved off π_0
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert {s["round"] for s in samples} == {0, 1} and all(isinstance(t, str) for s in samples for t in s["samples"])
    assert (run / "plots" / "client_rewards.png").exists()


@pytest.mark.parametrize(
    "aggregation,privacy",
    [
        ({"kind": "ckks", "masking": {"colluders": 0.0, "dropouts": 0.0}}, {"mode": "none"}),  # 2 clients: no colluder bound
        ({"kind": "plain"}, {"mode": "client", "noise_multiplier": 0.5, "clip_norm": 0.1}),
        ({"kind": "plain"}, {"mode": "record", "noise_multiplier": 1.0, "batch_size": 10}),
    ],
    ids=["ckks", "client-dp", "record-dp"],
)
def test_the_lora_vector_goes_through_every_aggregation_and_privacy_mode(tmp_path, cache_dir, aggregation, privacy):
    data = write_imdb_parquet(tmp_path / "data")
    raw = {
        "seed": 1,
        "task": tiny_task_mapping(),
        "federation": {"rounds": 1, "local_epochs": 1, "min_clients": 2, "weighting": "uniform"},
        "aggregation": aggregation,
        "privacy": privacy,
    }
    run = run_federation(config_from_dict(raw), RunOptions(data_dir=data, out=tmp_path / "runs", progress=False))
    (row,) = _rows(run)
    assert row["clients_aggregated"] == 2
    assert 0.0 <= row["positive_rate_mean"] <= 1.0
    model = load_tensors(run / "model.safetensors")
    assert all("lora_" in k for k in model)
    assert any(np.abs(v).max() > 0 for k, v in model.items() if ".lora_B." in k)


@pytest.mark.slow
@pytest.mark.integration
def test_default_config_raises_the_positive_rate_and_higher_lambda_scores_higher_on_its_own_reward(shared_datasets, cache_dir, tmp_path):
    """The from-scratch GPT-2 preset (configs/imdb-scratch.yaml, pretraining included): the judge's positive rate on held-out
    prompts ends above the initial policy's, and client k's own shaped reward grows with λ_k."""
    rc = main(
        [
            "run",
            str(REPO / "configs" / "imdb-scratch.yaml"),
            "--data-dir",
            str(shared_datasets),
            "--out",
            str(tmp_path / "runs"),
            "--no-progress",
        ]
    )
    assert rc == 0
    run = next(p for p in (tmp_path / "runs").iterdir() if p.name.startswith("imdb") and p.is_dir() and not p.is_symlink())
    rows = _rows(run)
    initial = json.loads((run / "summary.json").read_text())["baselines"]["initial_policy"]
    assert rows[-1]["positive_rate_mean"] > initial["positive_rate"]
    own = np.asarray([rows[-1][f"shaped_reward_client{k}_mean"] for k in range(5)])  # λ = 0.1, 0.3, 0.5, 0.7, 0.9
    rank = np.argsort(np.argsort(own))
    spearman = 1 - 6 * float(((rank - np.arange(5)) ** 2).sum()) / (5 * 24)
    assert spearman >= 0.9  # at most one adjacent pair out of λ order
    assert own[4] > own[2] > own[0]
