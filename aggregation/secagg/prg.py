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

import threading

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


CHUNK_BYTES = 1 << 18
"""Keystream is produced and consumed in 256 KiB pieces: each piece is written by AES and read by the
add while it is still in the core's L2 cache, and the scratch stays bounded whatever the vector length
(measured on the 2-core box: 77 µs per 400 KB mask in 256 KiB pieces vs 85 µs in one 400 KB piece)."""

_LOCAL = threading.local()
"""Per-thread scratch buffers: the halves are sans-IO and single-threaded, but a host may run rounds in threads."""


def _zeros(nbytes: int) -> memoryview:
    """A shared read-only run of zero bytes (the keystream is AES-CTR applied to zeros)."""
    zeros = getattr(_LOCAL, "zeros", None)
    if zeros is None or len(zeros) < nbytes:
        zeros = _LOCAL.zeros = bytearray(max(nbytes, CHUNK_BYTES))
    return memoryview(zeros)[:nbytes]


def _scratch(name: str, nbytes: int) -> bytearray:
    buf = getattr(_LOCAL, name, None)
    if buf is None or len(buf) < nbytes:
        buf = bytearray(nbytes)
        setattr(_LOCAL, name, buf)
    return buf


class Keystream:
    """The AES-256-CTR keystream of one 32-byte key, read piece by piece (the same bytes as :func:`expand`).

    Used for stochastic-rounding coins (:mod:`.quantize`): a vetted PRF keyed from ``os.urandom``,
    never numpy's generator. Each :meth:`uint32` result is a view of a per-thread scratch buffer,
    valid until the next call on this thread.
    """

    def __init__(self, seed: bytes) -> None:
        if len(seed) != SEED_BYTES:
            raise ValueError(f"keystream key must be {SEED_BYTES} bytes, got {len(seed)}")
        self._enc = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_IV)).encryptor()

    def uint32(self, count: int) -> np.ndarray:
        nbytes = 4 * count
        buf = _scratch("coins", nbytes + 15)
        self._enc.update_into(_zeros(nbytes), buf)
        return np.frombuffer(buf, dtype="<u4", count=count)


def add_mask(acc: np.ndarray, seed: bytes, sign: int) -> None:
    """``acc += sign * expand(seed, len(acc))`` (mod 2^bits) without allocating the mask.

    The keystream lands, :data:`CHUNK_BYTES` at a time, in a reusable per-thread scratch buffer and is
    added to the matching slice of ``acc`` at once: no allocation and no page faults per mask, and
    the piece is still in cache when the add reads it. CTR mode is a stream, so the pieces are
    exactly the bytes of one :func:`expand` call.
    """
    if len(seed) != SEED_BYTES:
        raise ValueError(f"mask seed must be {SEED_BYTES} bytes, got {len(seed)}")
    if acc.dtype not in (np.dtype(np.uint32), np.dtype(np.uint64)) or acc.ndim != 1:
        raise ValueError(f"masks are added to flat uint32 or uint64 vectors, not {acc.dtype}{acc.shape}")
    item = acc.itemsize
    step = CHUNK_BYTES // item
    buf = _scratch("mask", CHUNK_BYTES + 15)  # update_into wants block_size - 1 spare bytes
    enc = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_IV)).encryptor()
    op = np.add if sign > 0 else np.subtract
    for start in range(0, acc.size, step):
        stop = min(acc.size, start + step)
        enc.update_into(_zeros((stop - start) * item), buf)
        part = acc[start:stop]
        op(part, np.frombuffer(buf, dtype=acc.dtype, count=stop - start), out=part)
