"""The federation engine on a toy task whose updates are known in closed form."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from crash_points import SimulatedCrash, crash_after
from toy_task import toy_config

from aggregation import wire
from fedrlhf_secure.config import config_from_dict
from fedrlhf_secure.configtypes import ConfigError
from fedrlhf_secure.federation.engine import RunOptions, run_federation
from fedrlhf_secure.rundir import load_tensors


def _run(tmp_path: Path, **fed) -> Path:
    cfg = config_from_dict(toy_config(**fed))
    return run_federation(cfg, RunOptions(out=tmp_path, progress=False))


def test_fedavg_weights_updates_by_example_count(tmp_path):
    run = _run(tmp_path, rounds=1, sparse_rows="all")
    w = load_tensors(run / "model.safetensors")["w"]
    # client c (weight c+1) moves w from 0 by 0.5*c (± 1e-3 noise): sum_c (c+1)*0.5c / sum (c+1) = 0.5*20/10
    assert w == pytest.approx(np.full(4, 1.0), abs=5e-3)


def test_uniform_weighting_gives_the_plain_mean(tmp_path):
    run = _run(tmp_path, rounds=1, weighting="uniform", sparse_rows="all")
    w = load_tensors(run / "model.safetensors")["w"]
    assert w == pytest.approx(np.full(4, 0.5 * 1.5), abs=5e-3)


def test_sparse_rows_are_normalised_by_the_weight_of_clients_that_touched_them(tmp_path):
    touched = load_tensors(_run(tmp_path / "a", rounds=1, sparse_rows="touched") / "model.safetensors")["table"]
    diluted = load_tensors(_run(tmp_path / "b", rounds=1, sparse_rows="all") / "model.safetensors")["table"]
    # row 0 is touched only by client 0 (weight 1, value 1); row 1 by clients 0 and 1 (weights 1, 2; values 1, 2)
    assert touched[0] == pytest.approx([1.0, 1.0])
    assert touched[1] == pytest.approx([(1 * 1 + 2 * 2) / 3] * 2)
    assert touched[5] == pytest.approx([0.0, 0.0])  # nobody touched row 5 (4 clients touch rows 0..4)
    # plain FedAvg dilutes row 0 by the total weight 10
    assert diluted[0] == pytest.approx([0.1, 0.1])


def test_personal_parameters_never_appear_in_any_message(tmp_path):
    seen: list[bytes] = []
    cfg = config_from_dict(toy_config(rounds=2))
    run_federation(cfg, RunOptions(out=tmp_path, progress=False, hook=lambda s, d, b: seen.append(b)))
    assert len(seen) > 4 * 2 * 3
    # every message is a valid frame, and no personal value's float32 bytes occur in any of them
    for data in seen:
        wire.decode(data)
    for cid in range(4):
        for k in range(3):
            for step in range(3):
                value = np.float32(1000.0 + cid + k / 7 + step)
                needle = struct.pack("<f", value)
                assert not any(needle in m for m in seen), f"personal value of client {cid} leaked"


def test_same_config_and_seed_give_identical_metrics(tmp_path):
    a = (_run(tmp_path / "a") / "metrics.jsonl").read_text().splitlines()
    b = (_run(tmp_path / "b") / "metrics.jsonl").read_text().splitlines()
    strip = lambda rows: [{k: v for k, v in json.loads(r).items() if not k.startswith("seconds")} for r in rows]
    assert strip(a) == strip(b)
    assert len(a) == 2


def test_worker_processes_give_the_same_model_as_one_process(tmp_path):
    one = load_tensors(_run(tmp_path / "a") / "model.safetensors")
    two = load_tensors(_run(tmp_path / "b", workers=2) / "model.safetensors")
    for k in one:
        np.testing.assert_array_equal(one[k], two[k])


def test_run_directory_has_the_contracted_files(tmp_path):
    run = _run(tmp_path)
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "model.safetensors", "plots/metrics_per_round.png"):
        assert (run / name).exists(), name
    assert not (run / "checkpoint").exists()
    assert not list(tmp_path.glob("*.partial"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["seed"] == 3
    assert summary["versions"]["numpy"] == np.__version__


def test_a_bad_config_leaves_no_run_directory(tmp_path):
    with pytest.raises(ConfigError, match="federation.roundz"):
        config_from_dict(toy_config(roundz=3))
    cfg = config_from_dict(toy_config(min_clients=9))
    with pytest.raises(ConfigError, match="federation.min_clients: must be at most the task's 4 clients, got 9"):
        run_federation(cfg, RunOptions(out=tmp_path, progress=False))
    assert list(tmp_path.iterdir()) == []


def test_a_crash_in_the_first_round_of_a_non_private_run_leaves_nothing(tmp_path):
    cfg = config_from_dict(toy_config())
    with pytest.raises(SimulatedCrash):
        run_federation(cfg, RunOptions(out=tmp_path, progress=False, on_commit=crash_after(2)))
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_run_resumes_from_its_last_completed_round(tmp_path):
    from fedrlhf_secure.federation.engine import resume_federation

    cfg = config_from_dict(toy_config(rounds=3))
    with pytest.raises(SimulatedCrash):
        run_federation(cfg, RunOptions(out=tmp_path / "x", progress=False, on_commit=crash_after(4 * 2 + 1)))
    (partial,) = list((tmp_path / "x").glob("*.partial"))
    resumed = resume_federation(partial, RunOptions(progress=False))
    straight = _run(tmp_path / "y", rounds=3)
    a = load_tensors(resumed / "model.safetensors")
    b = load_tensors(straight / "model.safetensors")
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6)
    rows = [json.loads(line)["round"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert rows == [0, 1, 2]


def test_under_ckks_no_message_carries_the_global_model(tmp_path):
    pytest.importorskip("tenseal")
    seen: list[tuple[int, int, bytes]] = []
    raw = toy_config(rounds=2)
    raw["aggregation"] = {"kind": "ckks"}
    cfg = config_from_dict(raw)
    run = run_federation(cfg, RunOptions(out=tmp_path, progress=False, hook=lambda s, d, b: seen.append((s, d, b))))
    final = load_tensors(run / "model.safetensors")
    fits = [wire.decode(b) for s, d, b in seen if wire.decode(b).kind == "fed/fit"]
    assert fits and all(f.header["client_held"] and not f.tensors for f in fits)
    plain_seen: list[bytes] = []
    plain_run = run_federation(
        config_from_dict(toy_config(rounds=2)), RunOptions(out=tmp_path / "p", progress=False, hook=lambda s, d, b: plain_seen.append(b))
    )
    # the contrast: under plain FedAvg the broadcast does carry the global model
    assert any(wire.decode(b).kind == "fed/fit" and wire.decode(b).tensors for b in plain_seen)
    np.testing.assert_allclose(final["w"], load_tensors(plain_run / "model.safetensors")["w"], rtol=1e-4, atol=1e-4)


def test_a_round_whose_aggregation_aborts_leaves_the_model_unchanged_and_the_run_goes_on(tmp_path):
    raw = toy_config(rounds=2, dropout_rate=0.99)
    raw["aggregation"] = {"kind": "secagg", "threshold": 3}
    run = run_federation(config_from_dict(raw), RunOptions(out=tmp_path, progress=False))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    assert all(r["aggregation_aborted"] and r["clients_aggregated"] == 0 for r in rows)
    w = load_tensors(run / "model.safetensors")["w"]
    np.testing.assert_array_equal(w, np.zeros(4, np.float32))
