"""What a new user sees: strict JSON, plain log lines off a terminal, a table for every command,
and bad input refused by name (issue: a newcomer's first hour)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from movielens_fixtures import write_ml100k

from fedrlhf_secure.cli import main
from fedrlhf_secure.progress import LogLines
from fedrlhf_secure.rundir import strict_json

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "movielens-tiny.yaml"


def strict_load(text: str):
    """``json.loads`` that refuses NaN/Infinity, as JavaScript's JSON.parse does."""

    def refuse(name: str):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture()
def fixture_data(tmp_path: Path) -> Path:
    write_ml100k(tmp_path / "data", n_users=12, n_items=40, per_user=20)
    return tmp_path / "data"


def small_config(tmp_path: Path) -> Path:
    path = tmp_path / "small.yaml"
    path.write_text(
        "seed: 0\n"
        "task: {kind: movielens, split: u1, user_dim: 4, item_dim: 4, genre_dim: 2, hidden_dim: 8, personal_epochs: 1}\n"
        "federation: {rounds: 2, local_epochs: 1, min_clients: 2}\n"
        "aggregation: {kind: plain}\n"
        "privacy: {mode: none}\n"
        "baselines: [majority]\n",
        encoding="utf-8",
    )
    return path


def test_a_run_piped_to_a_file_writes_plain_lines_and_no_carriage_returns(tmp_path, fixture_data):
    log = tmp_path / "run.log"
    with open(log, "wb") as fh:
        proc = subprocess.run(
            [sys.executable, "-m", "fedrlhf_secure.cli", "run", str(small_config(tmp_path))]
            + ["--data-dir", str(fixture_data), "--out", str(tmp_path / "runs")],
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            timeout=300,
        )
    text = log.read_bytes()
    assert proc.returncode == 0, text.decode()
    assert b"\r" not in text
    lines = text.decode().splitlines()
    assert any(line.startswith("movielens · plain: 2/2 rounds") for line in lines), lines  # the progress, as a log line
    header = next(i for i, line in enumerate(lines) if line.startswith("| model |"))
    assert lines[header] == "| model | held-out accuracy | train accuracy |"
    assert lines[header + 2].startswith("| federated | 0.") and lines[header + 3].startswith("| majority | 0.")
    assert (tmp_path / "runs" / "latest" / "summary.json").is_file()


def test_summary_and_metrics_are_strict_json_with_null_for_a_missing_number(tmp_path, fixture_data, capsys):
    args = ["run", str(small_config(tmp_path)), "--data-dir", str(fixture_data), "--out", str(tmp_path / "runs"), "--no-progress"]
    assert main(args) == 0
    run = tmp_path / "runs" / "latest"
    summary = strict_load((run / "summary.json").read_text())
    rows = [strict_load(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert summary["headline_metrics"][0] == {
        "key": "heldout_accuracy",
        "label": "held-out accuracy",
        "unit": "fraction of ratings predicted right",
    }


def test_a_missing_or_non_finite_number_is_written_as_null():
    # a client with no held-out ratings has accuracy NaN (25 of the tiny config's 40 clients on real u1)
    row = {"accuracy": float("nan"), "eps": np.float64("inf"), "n": np.int64(0), "per": [1.5, float("-inf")], "v": np.array([np.nan, 2.0])}
    assert strict_load(strict_json(row)) == {"accuracy": None, "eps": None, "n": 0, "per": [1.5, None], "v": [None, 2.0]}


@pytest.mark.parametrize("flag", [["--epsilon", "inf"], ["--set", "privacy.delta=nan"], ["--set", "privacy.epsilon=-inf"]])
def test_a_non_finite_number_is_refused_as_bad_input_naming_the_key(flag, capsys):
    assert main(["run", str(TINY), "--set", "privacy.mode=record", *flag]) == 2
    err = capsys.readouterr().err
    assert "expected a finite number" in err and ("privacy.epsilon" in err or "privacy.delta" in err)


def test_an_unknown_set_key_is_blamed_on_the_set_option_not_on_the_file(capsys):
    assert main(["run", str(TINY), "--set", "task.nosuch=3"]) == 2
    err = capsys.readouterr().err
    assert "--set task.nosuch=3: unknown key task.nosuch" in err and str(TINY) not in err


def test_an_error_in_the_file_itself_is_still_blamed_on_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text() + "\nnot_a_section: 1\n")
    assert main(["run", str(bad), "--set", "federation.rounds=1"]) == 2
    assert f"{bad}: unknown key" in capsys.readouterr().err


def test_resume_of_a_directory_that_is_not_a_run_says_so(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    assert main(["run", "--resume", str(tmp_path / "photos")]) == 2
    err = capsys.readouterr().err
    assert "is not a run directory" in err and "completed" not in err


def test_baseline_prints_a_table_and_becomes_runs_latest(tmp_path, fixture_data, capsys):
    out = tmp_path / "runs"
    assert main(["baseline", str(small_config(tmp_path)), "--which", "majority", "--data-dir", str(fixture_data), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "| model | held-out accuracy | train accuracy |"
    assert printed[2].startswith("| majority | 0.")
    assert (out / "latest").resolve().name.startswith("movielens-baselines-")


def test_log_lines_give_done_total_rate_and_eta_at_most_every_fifteen_seconds(caplog):
    now = [0.0]
    lines = LogLines(10, "audit", "run", clock=lambda: now[0])
    with caplog.at_level("INFO", logger="fedrlhf_secure.progress"):
        for _ in range(3):
            now[0] += 4.0
            lines.update()  # 4, 8, 12 s: quiet
        now[0] += 4.0
        lines.update()  # 16 s: 4 of 10 done at 4 s each → 24 s left
        for _ in range(6):
            lines.update()  # the last one reports completion at once
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "audit: 4/10 runs · 4.0 s/run · ETA 0:24 · elapsed 0:16",
        "audit: 10/10 runs · 1.6 s/run · elapsed 0:16",
    ]
