"""`fedrlhf audit RUN --quick` on kind: rlhf runs of your own preference data (tiny model, generated
jsonl, no network): the LOSS attack scores the clients' preference rows (prompt + chosen) and the
one-run canary bound re-runs the config with preference-row canaries.

The claim tested is the audit's, not a privacy claim: on an ordinary run the attack is near chance
and ε̂ is 0. The weakened control (a run that memorises its rows, where the same attack must succeed)
is not here yet: see docs/rlhf.md, Audits, for the attempts measured and why they did not count.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import yaml

from fedrlhf_secure.cli import main

WORDS = (
    "alpha bravo cedar delta ember fjord grove harbor island jasper kettle lumen meadow "
    "nectar orchid pebble quartz raven saffron tundra umber violet willow xenon yarrow zephyr"
).split()
USERS = ("ann", "bob", "cy")
TINY = {"layers": 2, "hidden": 64, "heads": 2, "intermediate": 128, "vocab_size": 300}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDRLHF_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write_random_preferences(path: Path, per_user: int = 32, seed: int = 0) -> Path:
    """TRL preference rows whose texts are random word strings: a row can only be told apart from an
    unseen one by memorising it, which is exactly what a membership attack measures."""
    rng = np.random.default_rng(seed)
    rows = [
        {
            "prompt": f"Note {u} {i}:",
            "chosen": " " + " ".join(rng.choice(WORDS, 10)),
            "rejected": " " + " ".join(rng.choice(WORDS, 10)),
            "annotator": u,
        }
        for u in USERS
        for i in range(per_user)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_and_audit(tmp_path: Path, trainer_args: dict, rounds: int, canaries: int) -> dict:
    data = write_random_preferences(tmp_path / "prefs.jsonl")
    task = {
        "kind": "rlhf",
        "data": str(data),
        "partition": "user",
        "user_column": "annotator",
        "eval_fraction": 0.25,
        "model": "tiny",
        "tiny": TINY,
        "lora": {"rank": 8, "alpha": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "trainer": "dpo",
        "on_policy": False,
        "trainer_args": {"per_device_train_batch_size": 6, "max_length": 48, **trainer_args},
        "max_new_tokens": 4,
        "torch_threads": 1,
    }
    raw = {
        "seed": 0,
        "task": task,
        "federation": {"rounds": rounds, "local_epochs": 1, "min_clients": 3},
        "aggregation": {"kind": "plain"},
        "privacy": {"mode": "none"},
    }
    cfg = tmp_path / "byod.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["run", str(cfg), "--out", str(tmp_path / "runs"), "--name", "byod", "--no-progress"]) == 0
    run = next(p for p in (tmp_path / "runs").iterdir() if p.is_dir() and not p.is_symlink())
    args = ["audit", str(run), "--quick", "--canaries", str(canaries), "--seed", "1", "--no-progress", "--no-plots"]
    assert main(args) == 0
    return json.loads((run / "audit.json").read_text())


def test_the_quick_audit_attacks_preference_rows_and_finds_an_ordinary_dpo_run_near_chance(tmp_path, cache_dir):
    report = run_and_audit(tmp_path, {"learning_rate": 0.01}, rounds=2, canaries=20)
    released = report["released_parameters"]
    # members: the 3 × 24 training rows; non-members: the 3 × 8 held-out rows (every BYOD row is dealt)
    assert (released["members"], released["candidates"]) == (72, 96)
    loss = released["attacks"]["loss"]
    assert (loss["members"], loss["non_members"]) == (72, 24)
    assert 0.3 < loss["auc"] < 0.7
    eps = report["epsilon"]
    assert eps["canary_kind"] == "record" and eps["one_run"]["canaries"] == 20
    assert eps["estimate"] == 0.0 and eps["ceiling"] > 0
    assert report["verdict"] == "no-claim"
