"""Record-level DP-SGD settings handed to a task's local training (Opacus does the work)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DPSGDSettings:
    """Per-sample clipping to ``max_grad_norm`` and Gaussian noise ``noise_multiplier * max_grad_norm``
    with Poisson sampling at ``sample_rate`` (= expected batch size / client dataset size).

    ``noise_multiplier`` is calibrated by :mod:`fedrlhf_secure.privacy` for the whole run, not
    per round: tasks must not create their own accountant.
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
