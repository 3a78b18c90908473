"""End-to-end audits on a generated ML-100K fixture: the CI security gate and the server view.

The fixture is small (a few dozen users, hundreds of items) so these run in seconds; the same
audits on the real data are in ``test_attacks_real_data.py`` (slow).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from broken_noise import SilentNoise

from attacks.audit import AuditSettings, audit_run
from attacks.server_view import server_view_audit
from attacks.shadows import canary_task
from fedrlhf_secure.cli import main
from fedrlhf_secure.config import config_from_dict
from fedrlhf_secure.configtypes import InputError
from fedrlhf_secure.federation.engine import RunOptions, run_federation

GENRES = 19


def write_ml100k(root: Path, users: int, items: int, per_user: int, seed: int = 0, noise: float = 0.7) -> Path:
    """An ML-100K-format directory (u.item, u.user, u1.base, u1.test): per-item tastes plus
    per-rating noise (the larger ``noise``, the more a model must memorise rather than generalise)."""
    rng = np.random.default_rng(seed)
    d = root / "ml-100k"
    d.mkdir(parents=True)
    with open(d / "u.item", "w", encoding="latin-1") as fh:
        for i in range(1, items + 1):
            flags = (rng.random(GENRES) < 0.15).astype(int)
            fh.write(f"{i}|Movie {i} (1995)|01-Jan-1995||http://example.invalid/{i}|" + "|".join(map(str, flags)) + "\n")
    with open(d / "u.user", "w", encoding="latin-1") as fh:
        for u in range(1, users + 1):
            fh.write(f"{u}|{20 + u % 40}|{'MF'[u % 2]}|other|{10000 + u}\n")
    taste = rng.normal(0, 1, items)
    base, test = [], []
    for u in range(1, users + 1):
        rated = rng.choice(items, size=per_user, replace=False)
        for n, i in enumerate(rated):
            stars = int(np.clip(np.round(3 + 1.2 * taste[i] + rng.normal(0, noise)), 1, 5))
            (test if n % 5 == 0 else base).append(f"{u}\t{i + 1}\t{stars}\t{880000000 + n}\n")
    (d / "u1.base").write_text("".join(base))
    (d / "u1.test").write_text("".join(test))
    return root


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    return write_ml100k(tmp_path_factory.mktemp("ml"), users=12, items=400, per_user=50)


def dp_config(**privacy):
    return config_from_dict(
        {
            "seed": 0,
            "task": {"kind": "movielens", "split": "u1", "item_dim": 8, "user_dim": 8, "hidden_dim": 16},
            "federation": {"rounds": 2, "local_epochs": 2, "weighting": "uniform"},
            "privacy": {"mode": "record", "epsilon": 1.0, **privacy},
        }
    )


def audit_cli(run_dir: Path, data: Path, *extra: str) -> int:
    return main(
        ["audit", str(run_dir), "--data-dir", str(data), "--shadows", "0", "--canaries", "300", "--no-progress", "--no-plots", *extra]
    )


def test_broken_dp_run_is_caught_and_the_audit_fails_it(small_data, tmp_path, monkeypatch, capsys):
    # the mechanism is broken (an injected silent noise source) for the run and for the audit's canary run alike
    run = run_federation(dp_config(), RunOptions(data_dir=small_data, out=tmp_path, progress=False, noise=SilentNoise()))
    report = audit_run(run, small_data, AuditSettings(num_shadows=0, num_canaries=300), noise=SilentNoise())
    assert report["claimed"]["epsilon"] == pytest.approx(1.0, abs=0.05)
    assert report["epsilon"]["estimate"] > 1.0
    assert report["verdict"] == "fail"
    # the same verdict through the CLI front door is exit status 1 (the broken source injected into
    # the audit's own canary run through its one training function)
    from attacks import shadows

    real = shadows.train_released
    monkeypatch.setattr(shadows, "train_released", lambda *a, noise=None, **k: real(*a, noise=SilentNoise(), **k))
    assert audit_cli(run, small_data) == 1
    assert "verdict: FAIL" in capsys.readouterr().out


def test_correct_dp_run_passes_the_gate(small_data, tmp_path):
    run = run_federation(dp_config(), RunOptions(data_dir=small_data, out=tmp_path, progress=False))
    code = audit_cli(run, small_data)
    report = json.loads((run / "audit.json").read_text())
    assert report["epsilon"]["estimate"] <= report["claimed"]["epsilon"]
    assert report["verdict"] == "pass"
    assert code == 0


def test_shadow_attacks_find_members_of_a_non_private_run(small_data, tmp_path):
    cfg = config_from_dict(
        {
            "seed": 0,
            "task": {"kind": "movielens", "split": "u1", "item_dim": 16, "hidden_dim": 16, "item_lr": 0.1, "batch_size": 8},
            "federation": {"rounds": 2, "local_epochs": 10},
        }
    )
    run = run_federation(cfg, RunOptions(data_dir=small_data, out=tmp_path, progress=False))
    report = audit_run(run, small_data, AuditSettings(num_shadows=4, num_canaries=0))
    attacks = report["released_parameters"]["attacks"]
    assert set(attacks) == {"loss", "reference", "lira_online", "lira_offline", "rmia_online", "rmia_offline"}
    # ~600 candidates: AUC 0.5 has a standard error of ~0.025, so 0.6 is four of them above chance
    assert attacks["lira_online"]["auc"] > 0.6
    assert attacks["lira_offline"]["auc"] > 0.65
    assert report["verdict"] == "no-claim"
    assert (run / "plots" / "audit_roc.png").stat().st_size > 0


def test_server_reads_membership_from_a_plain_update_but_not_from_a_secure_aggregate(tmp_path):
    data = write_ml100k(tmp_path, users=50, items=300, per_user=30, seed=1)
    cfg = config_from_dict(
        {"seed": 0, "task": {"kind": "movielens", "split": "u1", "item_dim": 8, "hidden_dim": 16}, "federation": {"local_epochs": 2}}
    )
    result = server_view_audit(cfg, data, num_clients=50, secure_kind="secagg")
    assert result.clients == 50
    assert result.plain_update.auc > 0.95
    assert result.secure_aggregate.auc < 0.75
    assert result.plain_update.auc - result.secure_aggregate.auc > 0.25


def test_audit_of_a_missing_run_is_a_clear_error(tmp_path, capsys):
    assert main(["audit", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert "run directory not found" in capsys.readouterr().err


def test_too_few_canaries_are_refused(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main(["audit", str(tmp_path / "run"), "--canaries", "5", "--no-progress"]) == 2
    assert "--canaries must be 0 (no ε audit) or >= 20" in capsys.readouterr().err


def test_more_canaries_than_items_is_a_clear_input_error(small_data):
    with pytest.raises(InputError, match=r"--canaries 401: each canary needs its own item; .* has 400 items"):
        canary_task(dp_config(), small_data, 401, seed=0)


def test_a_server_view_of_fewer_than_50_clients_is_refused_before_any_training(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main(["audit", str(tmp_path / "run"), "--server-view", "--server-view-clients", "49", "--no-progress"]) == 2
    assert "fedrlhf audit: error: --server-view-clients must be >= 50" in capsys.readouterr().err
