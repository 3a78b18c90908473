"""CKKS parameters: the config section, the 128-bit security check, and TenSEAL contexts.

Why these defaults (``poly_modulus_degree=4096, coeff_mod_bit_sizes=[60, 49], scale_bits=28``):
aggregation needs only ciphertext additions — clients pre-multiply their update by their own
weight before encrypting (FedAvg's ``w_k x_k``, McMahan et al. 2017, eq. 1) — so no rescale ever
happens and a single data prime suffices. A ciphertext then carries two polynomials of ``N``
64-bit words modulo that one prime for ``N/2`` values, and SEAL's zstd stores a 60-bit residue in
about 8 of its 8 bytes (8.0x float32). The last prime is the key-switching ("special") prime that
TenSEAL requires; it is never part of a ciphertext, so its size costs nothing on the wire, and
60 + 49 = 109 bits is exactly the 128-bit bound at N = 4096. Since issue 12 every plaintext carries a
one-time mask below ``2^b`` (:mod:`.masking`), so decrypted values reach ``n (2^b + max_abs)``:
``2^(60 - 28 - 1) = 2^31`` is room for 1023 clients with ``max_abs`` 1024 (b = 21), at an encoding
precision of 2^-28 (one fresh ciphertext's error ~5.4e-7 RMS per value). Clients check that
headroom before the round (:func:`.masking.plan`), since an overflow would wrap silently modulo
the prime.

Seeded ciphertexts: SEAL can halve a symmetric-key ciphertext by sending the seed of its uniform
polynomial instead of the polynomial, but only through ``Encryptor.encrypt_symmetric`` returning a
``Serializable<Ciphertext>``; TenSEAL's symmetric mode encrypts into a plain ``Ciphertext`` (full
size — measured: 32.07 bytes per value, same as public-key encryption), and its ``sealapi`` binding
leaves the serializable type unregistered and saves only to file paths. So the size lever left is
the data prime: zstd saves whole zero bytes only (60-bit prime: 8.04x; 56-bit: 7.6x; 48-bit: 6.9x).

Security: the HE standard (Albrecht et al., "Homomorphic Encryption Security Standard", 2018,
Table 1, classical 128-bit, ternary secret) bounds ``log2(Q)``, the total bits of the whole chain,
per ring degree; parameter sets above the bound are refused with an error naming both.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

import tenseal as ts

MAX_LOG_Q_128: dict[int, int] = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
"""HE standard, Table 1: the largest ``log2(Q)`` with 128-bit classical security, per ring degree ``N``."""

SEAL_MAX_PRIME_BITS = 60
MASKING_FIXED = frozenset({"clip_range", "bits", "levels", "max_weight", "weight_resolution", "noise_bound"})
"""SecAgg fields the mask plan sets (the masks are exact integers below ``2^(b+f)``)."""


@dataclass(frozen=True)
class CKKSConfig:
    """``aggregation: {kind: ckks, ...}``.

    ``coeff_mod_bit_sizes``: the modulus chain; every prime but the last holds ciphertext data
    (one is enough: there are no rescales), the last is TenSEAL's key-switching prime.
    ``scale_bits``: CKKS encodes ``round(x * 2^scale_bits)``. ``rotate_keys``: ``run`` deals one
    key per run, ``round`` a fresh key every round (a key compromised in one round then reveals
    nothing about the others). ``threads``: TenSEAL worker threads per party.
    """

    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 49)
    scale_bits: int = 28
    rotate_keys: Literal["run", "round"] = "run"
    threads: int = 1
    max_abs: float = 1024.0
    """Bound on every coordinate of a client's ``[w x, w]`` (a larger one is refused, never wrapped):
    the masks live modulo ``2^b`` with ``2^(b-1) > clients * max_abs`` (:mod:`.masking`)."""
    min_contributors: int | Literal["auto"] = "auto"
    """A client decrypts only an aggregate of at least this many distinct clients, verified by the
    aggregate check; ``auto`` = the SecAgg threshold of the round (at least 2)."""
    flood_queries: int = 16
    """Decryptions under one key whose results may leave (rounds x hosts) the flooding noise is sized for."""
    check_fraction: float = 0.125
    """Secret check slots per payload slot (at least 16 per aggregate)."""
    masking: dict[str, Any] = field(default_factory=dict)
    """Parameters of the SecAgg+ round that sums the masks (``neighbours``, ``threshold``,
    ``signatures``, ``identity_dir``, ...; :class:`aggregation.secagg.SecAggConfig`); the
    fixed-point fields are set by the mask plan."""

    def __post_init__(self) -> None:
        n = self.poly_modulus_degree
        if n not in MAX_LOG_Q_128:
            raise ValueError(f"aggregation.poly_modulus_degree must be one of {sorted(MAX_LOG_Q_128)}, got {n}")
        bits = tuple(self.coeff_mod_bit_sizes)
        if len(bits) < 2:
            raise ValueError(
                "aggregation.coeff_mod_bit_sizes needs at least two primes (one data prime and TenSEAL's "
                f"key-switching prime), got {list(bits)}"
            )
        min_bits = int(math.log2(2 * n)) + 2  # a prime = 1 mod 2N needs more bits than 2N
        for i, b in enumerate(bits):
            if not min_bits <= b <= SEAL_MAX_PRIME_BITS:
                raise ValueError(
                    f"aggregation.coeff_mod_bit_sizes[{i}] = {b}: each prime must have {min_bits}.."
                    f"{SEAL_MAX_PRIME_BITS} bits for poly_modulus_degree={n}"
                )
        log_q = sum(bits)
        bound = MAX_LOG_Q_128[n]
        if log_q > bound:
            raise ValueError(
                f"aggregation.coeff_mod_bit_sizes {list(bits)} total {log_q} bits, above the 128-bit security "
                f"bound of {bound} bits for poly_modulus_degree={n} (HE standard 2018, Table 1); "
                f"use fewer/smaller primes or a larger poly_modulus_degree"
            )
        if not 20 <= self.scale_bits <= self.data_bits - 2:
            raise ValueError(
                f"aggregation.scale_bits = {self.scale_bits} must be in 20..{self.data_bits - 2} "
                f"(below the {self.data_bits} data bits of coeff_mod_bit_sizes {list(bits)}, leaving headroom)"
            )
        if self.threads < 1:
            raise ValueError(f"aggregation.threads must be >= 1, got {self.threads}")
        if not (math.isfinite(self.max_abs) and self.max_abs > 0):
            raise ValueError(f"aggregation.max_abs must be a positive number, got {self.max_abs}")
        if self.min_contributors != "auto" and (isinstance(self.min_contributors, bool) or self.min_contributors < 2):
            raise ValueError(f"aggregation.min_contributors must be an integer >= 2 or 'auto', got {self.min_contributors!r}")
        if self.flood_queries < 1:
            raise ValueError(f"aggregation.flood_queries must be >= 1, got {self.flood_queries}")
        if not (math.isfinite(self.check_fraction) and 0 < self.check_fraction <= 1):
            raise ValueError(f"aggregation.check_fraction must be in (0, 1], got {self.check_fraction}")
        fixed = sorted(set(self.masking) & MASKING_FIXED)
        if fixed:
            raise ValueError(f"aggregation.masking.{fixed[0]} is set by the CKKS mask plan; remove it")
        from ..secagg.config import SecAggConfig  # here, not at the top: secagg never imports ckks, but keep params light

        try:
            SecAggConfig(**self.masking)
        except TypeError as exc:
            raise ValueError(f"aggregation.masking: {exc} (known keys: neighbours, threshold, signatures, identity_dir, ...)") from exc
        except ValueError as exc:
            raise ValueError(f"aggregation.masking: {exc}") from exc
        object.__setattr__(self, "masking", dict(self.masking))
        object.__setattr__(self, "coeff_mod_bit_sizes", bits)

    @property
    def slots(self) -> int:
        """Values per ciphertext (CKKS packs ``N/2`` of them)."""
        return self.poly_modulus_degree // 2

    @property
    def data_primes(self) -> int:
        return len(self.coeff_mod_bit_sizes) - 1

    @property
    def data_bits(self) -> int:
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def scale(self) -> float:
        return float(2**self.scale_bits)

    @property
    def log_q(self) -> int:
        return sum(self.coeff_mod_bit_sizes)

    def chunks(self, length: int) -> int:
        return -(-length // self.slots)

    def raw_ciphertext_bytes(self) -> int:
        """Uncompressed size of one fresh ciphertext's polynomial data (2 polys x N x data primes x 8)."""
        return 2 * self.poly_modulus_degree * self.data_primes * 8


def headroom(config: CKKSConfig) -> float:
    """The largest ``|sum_k w_k x_k|`` (any coordinate) that decrypts correctly.

    Decryption recovers the encoded coefficients modulo the data modulus ``q ~ 2^data_bits``; the
    coefficients of an encoding of values bounded by ``B`` are bounded by ``B * 2^scale_bits``, so
    ``B < 2^(data_bits - scale_bits - 1)`` is safe (one bit for the sign).
    """
    return float(2 ** (config.data_bits - config.scale_bits - 1))


def new_secret_context(config: CKKSConfig) -> ts.Context:
    """A fresh CKKS context with a new secret key (symmetric encryption: the clients hold the key).

    Symmetric encryption because every party that encrypts also holds the secret key; it has
    less fresh noise than public-key encryption, and the server gets no key material at all.
    """
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        config.poly_modulus_degree,
        coeff_mod_bit_sizes=list(config.coeff_mod_bit_sizes),
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
        n_threads=config.threads,
    )
    ctx.global_scale = config.scale
    return ctx


def public_context_bytes(ctx: ts.Context) -> bytes:
    """The parameters only: no secret, public, relinearisation or Galois key (what the server gets)."""
    return ctx.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=False)


def secret_context_bytes(ctx: ts.Context) -> bytes:
    """Parameters plus the secret key (what each client gets, encrypted to it)."""
    return ctx.serialize(save_public_key=False, save_secret_key=True, save_galois_keys=False, save_relin_keys=False)


MAX_PUBLIC_CONTEXT_BYTES = 4096
MAX_SECRET_CONTEXT_BYTES = 8 << 20


_LOADED: OrderedDict[tuple[bytes, int, int], ts.Context] = OrderedDict()
_LOADED_MAX = 4
_INHERITED: list[ts.Context] = []


def _forget_inherited_contexts() -> None:
    """In a forked child, never destroy a context the parent made. A TenSEAL context owns a thread
    pool whose threads did not survive the fork; destroying it in the child (when the memo cache
    evicts it) waits on them for ever. The child keeps the objects alive and builds its own."""
    _INHERITED.extend(_LOADED.values())
    _LOADED.clear()


os.register_at_fork(after_in_child=_forget_inherited_contexts)


def load_context(data: bytes, config: CKKSConfig, *, secret: bool) -> ts.Context:
    """Deserialize a context and check it matches ``config`` (and holds a secret key iff ``secret``).

    Building a SEAL context costs ~40 ms and ~1.7 MB (precomputed NTT tables), so deserializations
    are memoised by the SHA-256 of the exact bytes: in the in-process simulation the clients of one
    key epoch each authenticate and decrypt their own package, then share one context object for
    the identical secret bytes instead of holding 943 copies. A party can only hit an entry by
    presenting the very bytes it was built from.
    """
    limit = MAX_SECRET_CONTEXT_BYTES if secret else MAX_PUBLIC_CONTEXT_BYTES
    if not 0 < len(data) <= limit:
        raise ValueError(f"CKKS context is {len(data)} bytes; expected 1..{limit}")
    key = (hashlib.sha256(data).digest(), config.threads, config.scale_bits)
    ctx = _LOADED.get(key)
    if ctx is None:
        try:
            ctx = ts.context_from(bytes(data), n_threads=config.threads)
        except Exception as exc:  # TenSEAL raises assorted types for malformed bytes
            raise ValueError(f"not a valid TenSEAL context ({type(exc).__name__}: {exc})") from exc
        _LOADED[key] = ctx
        while len(_LOADED) > _LOADED_MAX:
            _LOADED.popitem(last=False)
    else:
        _LOADED.move_to_end(key)
    if ctx.is_private() != secret:
        want = "a secret key" if secret else "no secret key"
        raise ValueError(f"CKKS context must hold {want}")
    parms = ctx.seal_context().data.first_context_data().parms()
    if parms.poly_modulus_degree() != config.poly_modulus_degree:
        raise ValueError(f"CKKS context has poly_modulus_degree {parms.poly_modulus_degree()}, config says {config.poly_modulus_degree}")
    ctx.global_scale = config.scale
    return ctx
