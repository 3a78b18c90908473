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


@dataclass(frozen=True)
class DPSGDReport:
    """What a task's DP-SGD fit actually did, checked by the client's privacy plan before the ledger
    commit: the settings it trained with and how many noisy steps it took.

    A task that was handed :class:`DPSGDSettings` must return one of these (Opacus may take one
    step fewer per epoch than planned for some batch counts; the ledger records the steps taken).
    """

    steps: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float

    @classmethod
    def of(cls, settings: DPSGDSettings, steps: int) -> DPSGDReport:
        return cls(int(steps), float(settings.sample_rate), float(settings.noise_multiplier), float(settings.max_grad_norm))

    def as_dict(self) -> dict[str, float]:
        return {
            "steps": self.steps,
            "sample_rate": self.sample_rate,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
        }
