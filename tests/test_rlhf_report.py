"""The reward–KL frontier of kind: rlhf runs (`python -m fedrlhf_secure.tasks.rlhf.report --frontier`):
one curve per method, one point per round, the base model at KL 0, drawn from the runs' own files.

Tiny models on generated IMDb data (no network); the assertions are on frontier.json, the numbers
the plot is drawn from, checked against each run's metrics.jsonl and summary.json."""

from __future__ import annotations

import json
import os

import pytest
from imdb_fixtures import write_imdb_parquet
from test_rlhf_task import imdb_task_mapping

from fedrlhf_secure.config import config_from_dict
from fedrlhf_secure.federation.engine import RunOptions, run_federation
from fedrlhf_secure.tasks.rlhf.report import main

METHODS = {
    "on-policy DPO": ({"trainer": "dpo", "on_policy": True}, 2),
    "offline DPO": ({"trainer": "dpo", "on_policy": False}, 1),
    "GRPO (reward model)": (
        {
            "trainer": "grpo",
            "reward": "model",
            "trainer_args": {"learning_rate": 0.05, "per_device_train_batch_size": 4},
            "reward_args": {"per_device_train_batch_size": 8, "max_length": 32, "max_steps": 2},
        },
        1,
    ),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("frontier")
    old = os.environ.get("FEDRLHF_CACHE_DIR")
    os.environ["FEDRLHF_CACHE_DIR"] = str(root / "cache")
    data = write_imdb_parquet(root / "data", n_train=300, n_test=200)
    out = {}
    for method, (task, rounds) in METHODS.items():
        raw = {
            "seed": 1,
            "task": imdb_task_mapping(**task),
            "federation": {"rounds": rounds, "local_epochs": 1, "min_clients": 2},
            "aggregation": {"kind": "plain"},
            "privacy": {"mode": "none"},
            "baselines": ["initial_policy"],
        }
        options = RunOptions(data_dir=data, out=root / "runs", progress=False, name=method.split()[0].lower())
        out[method] = run_federation(config_from_dict(raw), options)
    yield out
    if old is None:
        os.environ.pop("FEDRLHF_CACHE_DIR", None)
    else:
        os.environ["FEDRLHF_CACHE_DIR"] = old


def test_the_frontier_has_one_curve_per_method_with_the_base_model_and_one_point_per_round(runs, tmp_path, capsys):
    assert main(["--frontier", *map(str, runs.values()), "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "frontier.json").read_text())
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
    assert [c["method"] for c in data["curves"]] == list(METHODS)
    assert "nats" in data["x"] and "P(positive)" in data["y"]
    first = json.loads((runs["on-policy DPO"] / "summary.json").read_text())["baselines"]["initial_policy"]
    assert data["base"]["judge_score"] == pytest.approx(first["judge_score"])
    for curve in data["curves"]:
        run = runs[curve["method"]]
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        base = json.loads((run / "summary.json").read_text())["baselines"]["initial_policy"]
        assert len(curve["points"]) == METHODS[curve["method"]][1] + 1 == len(rows) + 1
        assert curve["points"][0] == {
            "round": 0,
            "kl_to_base": 0.0,
            "judge_score": pytest.approx(base["judge_score"]),
            "positive_rate": pytest.approx(base["positive_rate"]),
        }
        for point, row in zip(curve["points"][1:], rows, strict=True):
            assert point["round"] == row["round"] + 1
            assert point["kl_to_base"] == pytest.approx(row["kl_to_base_mean"])
            assert point["judge_score"] == pytest.approx(row["judge_score_mean"])
            assert 0.0 <= point["judge_score"] <= 1.0
    printed = capsys.readouterr().out
    assert printed.count("(KL, judge P(positive)) per round") == 3


def test_the_frontier_refuses_a_folder_that_is_not_a_completed_rlhf_run_with_exit_status_2(runs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["--frontier", str(runs["offline DPO"]), str(tmp_path / "empty"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "empty/config.yaml: no such file" in err and "Traceback" not in err
    assert not (tmp_path / "frontier.json").exists()
