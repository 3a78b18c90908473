"""The one-run ε gate on the RLHF task: client-level DP with white-box gradient canaries in the audit block.

A ``kind: rlhf`` run (tiny Llama, FFA-LoRA, offline DPO on a generated preference file of 3
annotators) with ``privacy.mode: client``, ε = 8 and ``privacy.audit_canaries: auto`` (m = 20,000,
ceiling 8.091 at δ = 1e-5) carries its canaries on the audit block appended to the LoRA B matrices
(``fedrlhf_secure/federation/audit_block.py``: released coordinates the policy never reads). Each
kept canary is added to its holder's clipped update before the noise; ``fedrlhf audit RUN --quick``
scores them on the released ``model.safetensors``. The positive control switches the noise off through
the injected test source (:class:`broken_noise.SilentNoise`) while the ledger still claims ε = 8: the
gate must FAIL it (exit 1); the same run with honest noise must PASS (exit 0). So the gate on this task
cannot pass vacuously.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from broken_noise import SilentNoise
from test_rlhf_audit import byod_config

from attacks import bounds
from fedrlhf_secure.cli import main
from fedrlhf_secure.config import config_from_dict
from fedrlhf_secure.federation.engine import RunOptions, run_federation
from fedrlhf_secure.privacy.canaries import AUDIT_BLOCK, read_canaries
from fedrlhf_secure.rundir import load_tensors

CANARIES = 20_000  # privacy.audit_canaries: auto at ε = 8, δ = 1e-5


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDRLHF_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def dp_config(tmp_path: Path):
    raw = byod_config(tmp_path, {"learning_rate": 0.01}, rounds=2)
    raw["privacy"] = {"mode": "client", "epsilon": 8.0, "delta": 1e-5, "clip_norm": 1.0, "audit_canaries": "auto"}
    return config_from_dict(raw)


def run_and_gate(tmp_path: Path, capsys, noise) -> tuple[int, dict, Path]:
    run = run_federation(dp_config(tmp_path), RunOptions(out=tmp_path / "runs", progress=False, noise=noise))
    code = main(["audit", str(run), "--quick", "--no-progress", "--no-plots"])
    print(capsys.readouterr().out)
    return code, json.loads((run / "audit.json").read_text()), run


def test_rlhf_run_carries_its_canaries_on_an_audit_block_the_policy_never_reads(tmp_path, cache_dir, capsys):
    code, report, run = run_and_gate(tmp_path, capsys, SilentNoise())
    released = load_tensors(run / "model.safetensors")
    assert released[AUDIT_BLOCK].shape == (CANARIES,)
    assert any(k.endswith("lora_B.default.weight") or "lora_B" in k for k in released)
    placement, included = read_canaries(run)
    assert placement.size == CANARIES and 0.45 < included.mean() < 0.55
    e = report["epsilon"]
    assert e["plan"]["kind"] == "run" and e["canary_kind"] == "gradient"
    assert report["claimed"]["epsilon"] == pytest.approx(8.0, abs=1e-6)
    assert e["ceiling"] == pytest.approx(bounds.refutable_ceiling(CANARIES, 1e-5), abs=1e-9) and e["ceiling"] > 8.0
    # noise off: every guess right, ε̂ at the ceiling, above the claim: the gate fails the run
    assert e["one_run"]["correct"] == e["one_run"]["guesses"] == 2 * int(0.45 * CANARIES)
    assert e["estimate"] > 8.0
    assert report["verdict"] == "fail" and code == 1
    # the noise-off run is a non-private 2-round DPO run: the LOSS attack sees its rows (measured 0.704)
    assert report["released_parameters"]["attacks"]["loss"]["auc"] > 0.6


def test_rlhf_run_with_honest_client_level_noise_passes_the_gate(tmp_path, cache_dir, capsys):
    code, report, _ = run_and_gate(tmp_path, capsys, None)
    e = report["epsilon"]
    assert e["ceiling"] > 8.0  # the audit could have failed it
    assert e["estimate"] <= 8.0
    assert e["score_means"]["included"] > e["score_means"]["excluded"]  # the canaries are seen through the noise
    assert report["verdict"] == "pass" and code == 0
    # with client-level noise at ε = 8 the LOSS attack on the preference rows finds nothing (measured
    # 0.509 and 0.347 in two runs): its AUC stays inside what scores unrelated to membership give.
    # The noise is fresh from os.urandom each run, so the bound is the null distribution's: the
    # Mann-Whitney AUC of 72 vs 24 exchangeable scores has sd √((m+n+1)/(12mn)) = 0.068, and ±4.4 sd
    # (0.20 … 0.80) fails a run with no signal about once in 10^5.
    loss = report["released_parameters"]["attacks"]["loss"]
    m, n = loss["members"], loss["non_members"]
    assert (m, n) == (72, 24)
    null_sd = math.sqrt((m + n + 1) / (12 * m * n))
    assert abs(loss["auc"] - 0.5) < 4.4 * null_sd
