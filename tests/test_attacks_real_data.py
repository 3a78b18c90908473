"""The audits on real MovieLens-100K (../shared/datasets): slow, run with ``pytest -m slow``."""

from __future__ import annotations

from pathlib import Path

import pytest
from broken_noise import SilentNoise

from attacks.audit import AuditSettings, audit_run
from attacks.server_view import server_view_audit
from fedrlhf_secure.cli import main
from fedrlhf_secure.config import load_config
from fedrlhf_secure.federation.engine import RunOptions, run_federation

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_lira_finds_members_of_the_overfit_run(shared_datasets, tmp_path):
    config = load_config(REPO / "configs" / "movielens-overfit.yaml")
    run = run_federation(config, RunOptions(data_dir=shared_datasets, out=tmp_path, progress=False))
    report = audit_run(run, shared_datasets, AuditSettings(num_shadows=16, num_canaries=0))
    lira = report["released_parameters"]["attacks"]["lira_offline"]
    assert lira["auc"] > 0.65
    assert lira["tpr_at_1pct_fpr"] > 0.05  # 5x chance


@pytest.mark.parametrize("broken", [True, False], ids=["noise-forced-to-zero", "correct"])
def test_dp_gate_on_real_data(shared_datasets, tmp_path, broken):
    config = load_config(
        REPO / "configs" / "movielens-tiny.yaml",
        ["privacy.mode=record", "privacy.epsilon=1.0", "federation.local_epochs=2", "federation.weighting=uniform"],
    )
    # a broken mechanism is broken for the run and for the audit's canary run alike
    noise = SilentNoise() if broken else None
    run = run_federation(config, RunOptions(data_dir=shared_datasets, out=tmp_path, progress=False, noise=noise))
    report = audit_run(run, shared_datasets, AuditSettings(num_shadows=0, num_canaries=1000), noise=noise)
    if broken:
        assert report["epsilon"]["estimate"] > 1.0 and report["verdict"] == "fail"
    else:
        assert report["epsilon"]["estimate"] <= 1.0 and report["verdict"] == "pass"
        assert main(["audit", str(run), "--data-dir", str(shared_datasets), "--shadows", "0", "--canaries", "1000", "--no-progress"]) == 0


def test_server_view_plain_update_vs_secure_aggregate_of_50(shared_datasets):
    config = load_config(REPO / "configs" / "movielens.yaml")
    result = server_view_audit(config, shared_datasets, num_clients=50, secure_kind="secagg")
    assert result.plain_update.auc > 0.95
    assert result.secure_aggregate.auc < 0.7
