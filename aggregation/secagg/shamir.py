"""Shamir secret sharing (Shamir, CACM 1979) over GF(p), p = 2^61 - 1, vectorised with numpy.

Why this field: p is a Mersenne prime, so reduction mod p is a shift and an add, and every field
element fits a uint64. Products of two 61-bit elements do not fit 64 bits, so :func:`mulmod`
splits the operands into 32-bit limbs and folds the high parts using 2^61 = 1 (mod p); every
intermediate stays below 2^63. All functions take arrays and work on every element at once: one
client's secrets (the X25519 mask key and the self-mask seed, 64 bytes cut into 7-byte chunks) are
shared in one call, and the server reconstructs all the secrets it needs in one call.

Secrets are bytes; :func:`bytes_to_elements` cuts them into 56-bit chunks (< p, so the map is
injective) and :func:`elements_to_bytes` glues them back.

Randomness: polynomial coefficients come from ``os.urandom`` (61 random bits per coefficient, the
single value 2^61 - 1 folds to 0: a bias of 2^-61, far below anything observable).
"""

from __future__ import annotations

import os

import numpy as np

P = (1 << 61) - 1
"""The field modulus, the Mersenne prime 2^61 - 1."""
_P = np.uint64(P)
_M32 = np.uint64(0xFFFFFFFF)
_M29 = np.uint64((1 << 29) - 1)
CHUNK_BYTES = 7
"""Bytes per field element when sharing a byte string (56 bits < 61 bits)."""


def reduce(x: np.ndarray) -> np.ndarray:
    """``x mod p`` for uint64 ``x`` (any value below 2^64)."""
    x = (x & _P) + (x >> np.uint64(61))
    return np.where(x >= _P, x - _P, x)


def addmod(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    s = a + b  # both < p < 2^61: no overflow
    return np.where(s >= _P, s - _P, s)


def submod(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.where(a >= b, a - b, a + _P - b)


def mulmod(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a * b mod p`` for elements of GF(p) (uint64 arrays, broadcasting)."""
    a = np.asarray(a, dtype=np.uint64)
    b = np.asarray(b, dtype=np.uint64)
    a1, a0 = a >> np.uint64(32), a & _M32  # a1 < 2^29
    b1, b0 = b >> np.uint64(32), b & _M32
    hi = (a1 * b1) << np.uint64(3)  # a1*b1*2^64 = a1*b1*8 (mod p); < 2^61
    mid = a1 * b0 + a0 * b1  # < 2^62; mid*2^32 = (mid >> 29) + (mid & (2^29-1)) * 2^32 (mod p)
    mid = (mid >> np.uint64(29)) + ((mid & _M29) << np.uint64(32))  # < 2^33 + 2^61
    lo = reduce(a0 * b0)  # a0*b0 < 2^64
    return reduce(reduce(hi + mid) + lo)


def powmod(a: np.ndarray, e: int) -> np.ndarray:
    """``a ** e mod p`` element-wise (square and multiply over the bits of the public exponent)."""
    result = np.ones_like(np.asarray(a, dtype=np.uint64))
    base = np.asarray(a, dtype=np.uint64).copy()
    while e:
        if e & 1:
            result = mulmod(result, base)
        base = mulmod(base, base)
        e >>= 1
    return result


def invmod(a: np.ndarray) -> np.ndarray:
    """Multiplicative inverse by Fermat's little theorem; raises on zero (no inverse)."""
    a = np.asarray(a, dtype=np.uint64)
    if np.any(a == 0):
        raise ZeroDivisionError("0 has no inverse in GF(p)")
    return powmod(a, P - 2)


def random_elements(shape: tuple[int, ...]) -> np.ndarray:
    """Uniform-ish field elements from the OS CSPRNG (see the module note on the 2^-61 bias)."""
    count = int(np.prod(shape, dtype=np.int64))
    raw = np.frombuffer(os.urandom(8 * count), dtype=np.uint64).reshape(shape)
    return reduce(raw & _P)


def bytes_to_elements(secret: bytes) -> np.ndarray:
    """Cut ``secret`` into 7-byte big-endian chunks (the last one zero-padded) as field elements."""
    padded = secret + b"\0" * (-len(secret) % CHUNK_BYTES)
    chunks = np.frombuffer(padded, dtype=np.uint8).reshape(-1, CHUNK_BYTES).astype(np.uint64)
    out = np.zeros(chunks.shape[0], dtype=np.uint64)
    for i in range(CHUNK_BYTES):  # 7 vectorised steps, not a loop over elements
        out = (out << np.uint64(8)) | chunks[:, i]
    return out


def elements_to_bytes(elements: np.ndarray, length: int) -> bytes:
    """Inverse of :func:`bytes_to_elements`; raises if an element is not a 56-bit chunk."""
    el = np.asarray(elements, dtype=np.uint64)
    if np.any(el >> np.uint64(8 * CHUNK_BYTES)):
        raise ValueError("reconstructed value is not a valid secret chunk (shares are inconsistent)")
    cols = [(el >> np.uint64(8 * (CHUNK_BYTES - 1 - i))) & np.uint64(0xFF) for i in range(CHUNK_BYTES)]
    data = np.stack(cols, axis=-1).astype(np.uint8).tobytes()
    if any(data[length:]):
        raise ValueError("reconstructed secret has non-zero padding (shares are inconsistent)")
    return data[:length]


def split(secrets: np.ndarray, xs: np.ndarray, threshold: int) -> np.ndarray:
    """Shares of every secret at every point: ``shares[j, s] = f_s(xs[j])``.

    ``secrets`` is a 1-D array of field elements; each gets its own random polynomial ``f_s`` of
    degree ``threshold - 1`` with ``f_s(0) = secrets[s]``; any ``threshold`` shares of a secret
    determine it and fewer reveal nothing about it. ``xs`` must be distinct and non-zero.
    """
    secrets = np.asarray(secrets, dtype=np.uint64)
    xs = np.asarray(xs, dtype=np.uint64)
    if threshold < 1:
        raise ValueError(f"threshold must be >= 1, got {threshold}")
    if xs.size < threshold:
        raise ValueError(f"{xs.size} shares cannot meet threshold {threshold}")
    if np.any(xs == 0) or np.any(xs >= _P) or np.unique(xs).size != xs.size:
        raise ValueError("share points must be distinct non-zero field elements")
    coeffs = random_elements((threshold - 1, secrets.size))  # degree 1..t-1 coefficients
    # Horner: f(x) = s + x (c1 + x (c2 + ...)), evaluated at all points for all secrets.
    acc = np.zeros((xs.size, secrets.size), dtype=np.uint64)
    x = xs[:, None]
    for c in coeffs[::-1]:
        acc = mulmod(addmod(acc, c[None, :]), x)
    return addmod(acc, secrets[None, :])


def lagrange_at_zero(xs: np.ndarray) -> np.ndarray:
    """Lagrange basis values at 0 for each row of points: ``l[r, j] = prod_{m!=j} x_m / (x_m - x_j)``.

    ``xs`` has shape ``(batch, t)``: one set of ``t`` distinct share points per secret group.
    """
    xs = np.asarray(xs, dtype=np.uint64)
    batch, t = xs.shape
    num = np.ones((batch, t), dtype=np.uint64)
    den = np.ones((batch, t), dtype=np.uint64)
    for m in range(t):  # t vectorised steps over (batch, t)
        xm = xs[:, m : m + 1]
        mask = np.arange(t) != m
        num = np.where(mask, mulmod(num, xm), num)
        den = np.where(mask, mulmod(den, submod(xm, xs)), den)
    return mulmod(num, invmod(den))


def reconstruct(xs: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """Secrets from ``t`` shares each: ``xs`` is ``(batch, t)``, ``shares`` is ``(batch, t, s)``.

    Returns ``(batch, s)``: for every group, all ``s`` secrets shared with the same points.
    """
    xs = np.asarray(xs, dtype=np.uint64)
    shares = np.asarray(shares, dtype=np.uint64)
    if xs.ndim != 2 or shares.ndim != 3 or shares.shape[:2] != xs.shape:
        raise ValueError(f"shapes do not match: points {xs.shape}, shares {shares.shape}")
    if np.any(xs == 0):
        raise ValueError("share point 0 is the secret itself and never a share")
    sorted_xs = np.sort(xs, axis=1)
    if np.any(sorted_xs[:, 1:] == sorted_xs[:, :-1]):
        raise ValueError("share points within a group must be distinct")
    lam = lagrange_at_zero(xs)  # (batch, t)
    terms = mulmod(shares, lam[:, :, None])
    out = np.zeros((xs.shape[0], shares.shape[2]), dtype=np.uint64)
    for j in range(xs.shape[1]):
        out = addmod(out, terms[:, j, :])
    return out
