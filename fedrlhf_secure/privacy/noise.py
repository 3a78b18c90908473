"""Where DP noise comes from: one small injected object instead of a process-wide switch.

Every privacy mechanism of a run draws its noise through a :class:`NoiseSource` handed to it when
the run is built (``RunOptions.noise``; default :class:`SecretNoise`). The package ships only the
secret source. An audit must be able to prove that it catches a run whose noise is missing, so
tests build a deliberately broken source in their own code (``tests/broken_noise.py``) and inject
it; nothing in a config file, on the command line or in the shipped package can turn noise off.
"""

from __future__ import annotations

import numpy as np

from .discrete import skellam_share
from .randomness import secret_numpy_rng


class NoiseSource:
    """Gaussian and Skellam noise from a secret generator (:mod:`.randomness`), and the DP-SGD noise
    multiplier a task's local training is told to use (the planned one)."""

    def gaussian(self, std: float, size: int | tuple[int, ...]) -> np.ndarray:
        """N(0, std²) per coordinate, float64."""
        return secret_numpy_rng().normal(0.0, std, size)

    def skellam(self, variance: float, size: int) -> np.ndarray:
        """Symmetric Skellam per coordinate with the given variance, int64 (Agarwal et al. 2021)."""
        return skellam_share(size, variance)

    def dpsgd_noise_multiplier(self, planned: float) -> float:
        """The σ handed to Opacus for a release whose ledger entry claims ``planned``."""
        return planned


SecretNoise = NoiseSource
"""The shipped source, by the name that says what it is."""
