"""`fedrlhf audit RUN --quick` on kind: rlhf runs of your own preference data (tiny model, generated
jsonl, no network): the LOSS attack scores the clients' preference rows by their DPO logit
z = β·margin against the base policy (softplus(−z) is the row's DPO loss) and the one-run canary
bound re-runs the config with preference-row canaries.

The weakened control is the run without DP noise: on an ordinary non-private 2-round run the attack
sees the members (LOSS AUC 0.717, asserted > 0.6); with client-level DP noise at ε = 8 the same
attack on the same rows is at chance (0.509; tests/test_rlhf_audit_canaries.py, which also holds the
gradient-canary ε gate, noise off vs honest). A run tuned to memorise harder did not do better
through FedAvg: docs/rlhf.md, Audits, has the measurements.
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


def byod_config(
    tmp_path: Path, trainer_args: dict, rounds: int, per_user: int = 32, lora: dict | None = None, eval_fraction: float = 0.25
) -> dict:
    """A ``kind: rlhf`` config on a generated preference file: tiny model, FFA-LoRA, offline DPO, 3 annotators."""
    data = write_random_preferences(tmp_path / "prefs.jsonl", per_user=per_user)
    task = {
        "kind": "rlhf",
        "data": str(data),
        "partition": "user",
        "user_column": "annotator",
        "eval_fraction": eval_fraction,
        "model": "tiny",
        "tiny": TINY,
        "lora": lora or {"rank": 8, "alpha": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "trainer": "dpo",
        "on_policy": False,
        "trainer_args": {"per_device_train_batch_size": 6, "max_length": 48, **trainer_args},
        "max_new_tokens": 4,
        "torch_threads": 1,
    }
    return {
        "seed": 0,
        "task": task,
        "federation": {"rounds": rounds, "local_epochs": 1, "min_clients": 3},
        "aggregation": {"kind": "plain"},
        "privacy": {"mode": "none"},
    }


def run_and_audit(tmp_path: Path, trainer_args: dict, rounds: int, canaries: int, **options) -> dict:
    raw = byod_config(tmp_path, trainer_args, rounds, **options)
    cfg = tmp_path / "byod.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["run", str(cfg), "--out", str(tmp_path / "runs"), "--name", "byod", "--no-progress"]) == 0
    run = next(p for p in (tmp_path / "runs").iterdir() if p.is_dir() and not p.is_symlink())
    args = ["audit", str(run), "--quick", "--canaries", str(canaries), "--seed", "1", "--no-progress", "--no-plots"]
    assert main(args) == 0
    return json.loads((run / "audit.json").read_text())


def test_the_quick_audit_attacks_preference_rows_of_an_ordinary_non_private_dpo_run(tmp_path, cache_dir):
    report = run_and_audit(tmp_path, {"learning_rate": 0.01}, rounds=2, canaries=20)
    released = report["released_parameters"]
    # members: the 3 × 24 training rows; non-members: the 3 × 8 held-out rows (every BYOD row is dealt)
    assert (released["members"], released["candidates"]) == (72, 96)
    loss = released["attacks"]["loss"]
    assert (loss["members"], loss["non_members"]) == (72, 24)
    # the DPO logit of a row sees a plain 2-round run's members (measured 0.717; the likelihood of
    # prompt + chosen gave 0.608 on the same run); with DP noise it is at chance (test_rlhf_audit_canaries)
    assert 0.6 < loss["auc"] < 0.85
    eps = report["epsilon"]
    assert eps["canary_kind"] == "record" and eps["one_run"]["canaries"] == 20
    assert eps["estimate"] == 0.0 and eps["ceiling"] > 0
    assert report["verdict"] == "no-claim"


def test_a_preference_rows_score_is_its_dpo_logit_against_the_base_policy(tmp_path, cache_dir):
    """z = β·margin, so the LOSS attack's softplus(−z) is the row's DPO loss; under the base policy
    (FFA-LoRA's B = 0, the run's initial model) every margin, hence every score, is exactly 0."""
    from fedrlhf_secure.config import config_from_dict
    from fedrlhf_secure.federation.engine import build_task
    from fedrlhf_secure.tasks.rlhf.task import preference_margins

    task = build_task(config_from_dict(byod_config(tmp_path, {"beta": 0.5}, rounds=1, per_user=8)), None)
    records = task.training_records()
    initial = task.initial_shared()
    assert np.array_equal(task.record_scores(initial, records), np.zeros(len(records)))
    rng = np.random.default_rng(0)
    moved = {k: v + rng.normal(0, 0.5, v.shape).astype(np.float32) for k, v in initial.items()}
    z = task.record_scores(moved, records)
    policy = task.policy()
    policy.load_shared(moved)
    pairs = task._universe_rows(records[:, 1])
    np.testing.assert_allclose(z, 0.5 * preference_margins(policy, pairs), rtol=1e-6, atol=1e-9)
    assert np.std(z) > 0.1  # the moved policy prefers some rows' chosen text, not others'
    # the canary score is the same logit relative to the initial policy (0 there)
    np.testing.assert_allclose(task.canary_scores(moved, records[:5]), z[:5], rtol=1e-6, atol=1e-9)
