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
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


def secret_numpy_rng() -> np.random.Generator:
    """A NumPy generator seeded with 256 bits from ``os.urandom``."""
    return np.random.default_rng(np.random.SeedSequence(int.from_bytes(os.urandom(32), "little")))


def secret_torch_generator() -> torch.Generator:
    """A torch generator seeded with 63 bits from ``os.urandom`` (the most ``manual_seed`` takes)."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))


def secret_key() -> bytes:
    """256 fresh bits from ``os.urandom``: the key of a client's keyed randomness (:func:`keyed_uniforms`)."""
    return os.urandom(32)


def keyed_uniforms(key: bytes, label: bytes, count: int) -> np.ndarray:
    """``count`` uniforms in [0, 1) that are a function of (``key``, ``label``) alone: ChaCha20 keyed by
    HKDF-SHA256(``key``, info=``label``) (RFC 5869, RFC 8439), 53 bits per 64-bit word.

    Position ``i`` of the output depends on nothing but the key, the label and ``i``: a caller that
    indexes it by record gets per-record randomness that no other record, and no earlier draw, moves
    (the property record-level DP needs of anything a per-sample gradient depends on)."""
    if len(key) < 16:
        raise ValueError("keyed_uniforms needs a key of at least 128 bits")
    subkey = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fedrlhf-keyed-uniforms/" + label).derive(key)
    stream = Cipher(algorithms.ChaCha20(subkey, b"\x00" * 16), mode=None).encryptor().update(b"\x00" * (8 * int(count)))
    words = np.frombuffer(stream, dtype="<u8")
    return (words >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
