"""Record-level white-box Dirac canaries: records inside each DP-SGD step, on the audit block.

A run with ``privacy.mode: record`` and ``privacy.audit_canaries: m`` carries m canary records whose
clipped gradients are ``±C·e_c`` on coordinates of an audit block the model never reads; each is
Poisson-sampled into every DP-SGD step and added to the step's sum of clipped gradients before
Opacus adds the noise. The gate must fail a run whose noise is switched off (the injected
:class:`broken_noise.SilentNoise`, which hands DP-SGD σ = 0 while the ledger claims the planned σ)
and pass the same run with honest noise, so it cannot pass vacuously.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from broken_noise import SilentNoise

from attacks import bounds
from fedrlhf_secure.cli import main
from fedrlhf_secure.config import config_from_dict, load_config
from fedrlhf_secure.configtypes import ConfigError
from fedrlhf_secure.federation.engine import RunOptions, run_federation
from fedrlhf_secure.privacy.canaries import AUDIT_BLOCK, GradientCanaries, place_canaries, read_canaries
from fedrlhf_secure.privacy.dpsgd import AuditBlock, DPSGDSettings, RecordCanaries, make_private

# ------------------------------------------------------------------ config: m sized to the claim


def _privacy(**kw):
    return config_from_dict({"seed": 0, "task": {"kind": "movielens"}, "privacy": {"mode": "record", "epsilon": 8, **kw}}).privacy


def test_auto_sizes_the_canaries_to_the_claim():
    assert _privacy(audit_canaries="auto").audit_canary_count() == 20_000  # ceiling 8.091 > 8 at δ = 1e-5
    assert _privacy(audit_canaries="auto", epsilon=4).audit_canary_count() == 500
    assert _privacy(audit_canaries=300).audit_canary_count() == 300
    assert _privacy().audit_canary_count() == 0


def test_auto_without_a_budget_and_record_canaries_on_model_coordinates_are_refused():
    with pytest.raises(ConfigError, match="auto sizes m from privacy.epsilon"):
        config_from_dict(
            {"seed": 0, "task": {"kind": "movielens"}, "privacy": {"mode": "record", "noise_multiplier": 1.0, "audit_canaries": "auto"}}
        )
    with pytest.raises(ConfigError, match="client level only"):
        _privacy(audit_canaries=100, audit_coordinates="model")


# ------------------------------------------------------------------ the canaries are records of the replace-one relation


def test_a_record_canary_is_kept_with_its_sign_and_dropped_as_its_mirror_image():
    p = place_canaries(6, [(10, 16)], 16, [0, 1], 0.5, seed=3, mechanism="record")
    canaries = GradientCanaries(p, {0: np.array([True, False, True]), 1: np.array([False, False, True])}, block_start=10)
    settings = canaries.for_dpsgd(0, DPSGDSettings(1.0, 0.5, 0.25))
    mine = np.flatnonzero(p.holders == 0)
    assert np.array_equal(settings.canaries.offsets, p.coordinates[mine] - 10)  # offsets into the block
    assert np.allclose(settings.canaries.values, 0.5 * p.signs[mine] * np.array([1, -1, 1]))  # every canary present, |g| = C
    # the released vector is not touched after training: the canaries went in inside DP-SGD
    v = np.ones(16, dtype=np.float32)
    assert np.array_equal(canaries.insert(0, 0, v), v)
    assert settings == DPSGDSettings(1.0, 0.5, 0.25)  # the ledger's view of the settings is unchanged


def _linear_fit(block: AuditBlock, sigma: float, q: float, steps: int, n: int = 8, mode: str = "ghost") -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(n, 3), torch.randn(n, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dp = DPSGDSettings(sigma, 0.5, q, audit_block=block)
    module, dp_opt, loader, criterion = make_private(model, opt, n, dp, grad_sample_mode=mode, criterion=torch.nn.MSELoss())
    for _ in range(steps):
        for (idx,) in loader:
            dp_opt.zero_grad(set_to_none=True)
            if len(idx):
                criterion(module(x[idx]), y[idx]).backward()
            else:
                for p in module.parameters():
                    p.grad = torch.zeros_like(p)
            dp_opt.step()
    return module


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_canaries_go_into_the_clipped_sum_before_the_noise_and_nothing_else_moves_the_block(mode):
    start = np.array([0.0, 1.0, 0.0, 0.0], dtype=np.float32)
    canaries = RecordCanaries(np.array([0, 2]), np.array([0.5, -0.5], dtype=np.float32))
    block = AuditBlock(start, canaries)
    _linear_fit(block, sigma=0.0, q=1.0, steps=3, mode=mode)  # q = 1: every record and canary in every step; 3 steps
    # SGD on the clipped sum / expected batch size (8): each step moves a canary's coordinate by -lr·g/8
    assert block.steps == 3 and block.sampled == 6
    assert np.allclose(block.delta(), [-3 * 0.1 * 0.5 / 8, 0.0, 3 * 0.1 * 0.5 / 8, 0.0], atol=1e-7)
    # with noise the block is noised like every parameter, on every coordinate (canary or not)
    noisy = AuditBlock(start, None)
    _linear_fit(noisy, sigma=1.0, q=1.0, steps=2, mode=mode)
    assert np.all(noisy.delta() != 0.0)


def test_canaries_are_poisson_sampled_at_the_plans_rate():
    block = AuditBlock(np.zeros(400, dtype=np.float32), RecordCanaries(np.arange(400), np.full(400, 0.5, dtype=np.float32)))
    _linear_fit(block, sigma=0.0, q=0.25, steps=10, n=40)  # int(1/q) = 4 steps per pass
    draws = 400 * block.steps
    assert block.steps == 40
    assert abs(block.sampled / draws - 0.25) < 4 * math.sqrt(0.25 * 0.75 / draws)


# ------------------------------------------------------------------ the gate on a tiny real-data run


def _tiny(**privacy) -> list[str]:
    # 3 local epochs: at the median client's q = 0.2, 30 steps leave a canary unsampled with probability 0.001
    return ["privacy.mode=record", "privacy.epsilon=8", "privacy.audit_canaries=auto", "federation.local_epochs=3"] + [
        f"privacy.{k}={v}" for k, v in privacy.items()
    ]


@pytest.mark.parametrize("broken", [True, False], ids=["noise-off-fails", "honest-passes"])
def test_tiny_record_level_run_at_epsilon_8(shared_datasets, tmp_path, capsys, broken):
    cfg = load_config("configs/movielens-tiny.yaml", _tiny())
    run = run_federation(cfg, RunOptions(data_dir=shared_datasets, out=tmp_path, progress=False, noise=SilentNoise() if broken else None))
    placement, included = read_canaries(run)
    assert placement.size == 20_000 and placement.mechanism == "record" and 0.45 < included.mean() < 0.55
    code = main(["audit", str(run), "--data-dir", str(shared_datasets), "--quick", "--no-progress", "--no-plots"])
    out = capsys.readouterr().out
    print(out)
    report = json.loads((run / "audit.json").read_text())
    e = report["epsilon"]
    assert "largest ε it can refute: 8.091" in out.split("ε̂")[0]  # announced before the audit
    assert e["plan"]["kind"] == "run" and e["mechanism"] == "record"
    assert e["ceiling"] == pytest.approx(bounds.refutable_ceiling(20_000, 1e-5), abs=1e-9)
    assert e["ceiling"] > 8.0
    assert report["claimed"]["epsilon"] == pytest.approx(8.0, abs=1e-6)
    if broken:
        # the ledger claims the planned σ; without the noise every guess is right
        assert e["one_run"]["correct"] == e["one_run"]["guesses"] == 18_000
        assert e["estimate"] > 8.0 and report["verdict"] == "fail" and code == 1
    else:
        assert e["estimate"] < 2.0 and report["verdict"] == "pass" and code == 0
        assert e["score_means"]["included"] > e["score_means"]["excluded"]  # visible through the noise, not beyond the claim
    # the released model carries the block; the task's own parameters are the model
    from fedrlhf_secure.rundir import load_tensors

    assert load_tensors(Path(run) / "model.safetensors")[AUDIT_BLOCK].shape == (20_000,)
