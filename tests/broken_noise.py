"""A deliberately broken DP noise source, for tests only (it lives in tests/, not in the package).

Injected through ``RunOptions(noise=SilentNoise())`` it makes every mechanism add no noise (and hands
DP-SGD σ = 0) while every ledger entry still claims the configured noise: the positive control
that shows an audit can catch a run whose noise is missing.
"""

from __future__ import annotations

import numpy as np

from fedrlhf_secure.privacy.noise import NoiseSource


class SilentNoise(NoiseSource):
    def gaussian(self, std, size):
        return np.zeros(size, dtype=np.float64)

    def skellam(self, variance, size):
        return np.zeros(size, dtype=np.int64)

    def dpsgd_noise_multiplier(self, planned):
        return 0.0
