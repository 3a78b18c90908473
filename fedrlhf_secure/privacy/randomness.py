"""Generators for DP noise and Poisson sampling, seeded from ``os.urandom``.

A DP guarantee assumes the adversary cannot predict the noise or which records were sampled.
Seeding either from the run seed (written to ``config.yaml``) would let anyone who reads the config
regenerate and subtract the noise, so every DP release draws a fresh secret seed and DP runs are
deliberately not reproducible. The generators themselves (NumPy's PCG64, torch's Mersenne Twister)
are not cryptographically secure; Opacus' ``secure_mode`` (a CSPRNG via torchcsprng) has no build
for this torch. SECURITY.md §13 states the consequence.
"""

from __future__ import annotations

import os

import numpy as np
import torch


def secret_numpy_rng() -> np.random.Generator:
    """A NumPy generator seeded with 256 bits from ``os.urandom``."""
    return np.random.default_rng(np.random.SeedSequence(int.from_bytes(os.urandom(32), "little")))


def secret_torch_generator() -> torch.Generator:
    """A torch generator seeded with 63 bits from ``os.urandom`` (the most ``manual_seed`` takes)."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
