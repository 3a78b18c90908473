"""Mask expansion: a 256-bit seed -> a vector of uniform integers, with AES-256 in counter mode.

Why AES-CTR: it is a vetted PRF from ``cryptography`` (hardware-accelerated), and its keystream is
indistinguishable from uniform bytes, which read as little-endian uint32/uint64 are uniform modulo
2^32/2^64 — exactly the one-time pad the masked sum needs (Bonawitz et al., CCS 2017, §4). Every
seed is a fresh 32-byte key (pairwise seeds come from HKDF over an X25519 secret bound to the
session and round; self-mask seeds from ``os.urandom``), so the fixed zero IV never repeats under
one key. One call expands one whole mask: no per-element Python work, and none of Flower 1.42's
32-bit folding of the seed into numpy's RandomState.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SEED_BYTES = 32
_ZERO_IV = bytes(16)


def expand(seed: bytes, length: int, dtype: np.dtype | type) -> np.ndarray:
    """``length`` uniform integers of ``dtype`` (uint32 or uint64) from a 32-byte ``seed``."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"mask seed must be {SEED_BYTES} bytes, got {len(seed)}")
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.uint32), np.dtype(np.uint64)):
        raise ValueError(f"masks are uint32 or uint64, not {dt}")
    nbytes = length * dt.itemsize
    enc = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_IV)).encryptor()
    out = bytearray(nbytes + 15)  # update_into wants block_size - 1 spare bytes
    written = enc.update_into(_zeros(nbytes), out)
    return np.frombuffer(out, dtype=dt.newbyteorder("<"), count=length)[: written // dt.itemsize].astype(dt, copy=False)


_ZEROS = bytearray()


def _zeros(nbytes: int) -> memoryview:
    """A shared read-only run of zero bytes (the keystream is AES-CTR applied to zeros)."""
    global _ZEROS
    if len(_ZEROS) < nbytes:
        _ZEROS = bytearray(nbytes)
    return memoryview(_ZEROS)[:nbytes]


_SCRATCH = bytearray()


def add_mask(acc: np.ndarray, seed: bytes, sign: int) -> None:
    """``acc += sign * expand(seed, len(acc))`` (mod 2^bits) without allocating the mask.

    The keystream lands in a reusable scratch buffer (one per process; the halves are sans-IO and
    single-threaded), which spares a fresh allocation and its page faults for each of the k + 1
    masks a client adds and each mask the server removes.
    """
    global _SCRATCH
    if len(seed) != SEED_BYTES:
        raise ValueError(f"mask seed must be {SEED_BYTES} bytes, got {len(seed)}")
    if acc.dtype not in (np.dtype(np.uint32), np.dtype(np.uint64)) or acc.ndim != 1:
        raise ValueError(f"masks are added to flat uint32 or uint64 vectors, not {acc.dtype}{acc.shape}")
    nbytes = acc.nbytes
    if len(_SCRATCH) < nbytes + 15:
        _SCRATCH = bytearray(nbytes + 15)
    enc = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_IV)).encryptor()
    enc.update_into(_zeros(nbytes), _SCRATCH)
    mask = np.frombuffer(_SCRATCH, dtype=acc.dtype, count=acc.size)
    if sign > 0:
        acc += mask
    else:
        acc -= mask
