"""What makes a CKKS aggregate safe to decrypt: one-time masks, a secret check, noise flooding.

Without this module a server holding no key could return one client's own ciphertext as "the
aggregate"; every client decrypted it (error ~1e-9) and the value left in the released model
(issue 12, item 4). Three layers close that decryption oracle (docs/ckks.md has the argument):

1. **Masks bound to the agreed survivor set.** Client ``i`` adds a secret mask ``r_i``, uniform on
   the grid ``2^-f {0, .., 2^(b+f) - 1}``, to its plaintext before encrypting, and runs the SecAgg+
   client (:mod:`aggregation.secagg`, Bell et al. CCS 2020) on the integer vector ``r_i 2^f``. The
   SecAgg server learns only ``R = sum_{i in S} r_i mod 2^b`` for the one survivor set ``S`` it
   unmasks. A client decrypts ``v`` and keeps ``(v - R) mod 2^b`` (centred): exactly the sum over
   ``S`` when the ciphertext is ``sum_{i in S} c_i``; for any other combination, e.g. one client's
   ``c_j``, the result is ``x_j + (uniform mod 2^b)`` — noise.
2. **A secret check (authenticator).** All clients hold the CKKS secret key, the server does not;
   from it each derives ``k_check`` (:func:`check_key`). Per round, ``k_check`` picks secret slot
   positions and each client ``i`` puts the secret value ``tau_i`` there. After unmasking, the
   check slots must equal ``sum_{i in claimed} tau_i`` within the decryption error: a ciphertext
   that is not ``sum_{i in claimed} c_i`` (a subset, one client twice, a crafted ``(c0, c1)`` whose
   decryption is a known function of the key) fails with probability ``1 - (2 tol / 2^b)^checks``
   and is refused before anything is used. This is what lets a client verify that an aggregate
   "provably combines" its claimed contributors, so the minimum-contributors policy is checked on
   fact, not on the server's word.
3. **Noise flooding** (Li and Micciancio, Eurocrypt 2021; Li, Micciancio, Schultz, Sorrell, CRYPTO
   2022): the decryption error of CKKS depends on the secret key, and released decryptions let an
   adversary that knows the plaintext solve for it (IND-CPA-D). Each decrypted value gets Gaussian
   noise of standard deviation :func:`flood_sigma` before it is used. The noise is a PRF of the
   check key and the aggregate's bytes: every client that decrypts the same aggregate adds the same
   noise (the hosts' copies of the model agree), while two different ciphertexts get independent
   noise (a server that shows different hosts different aggregates gains nothing from differences).

Everything random here comes from ``os.urandom`` or from AES-CTR keyed by HKDF (:mod:`cryptography`),
never from a numpy generator.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import AggregationConfigError
from ..secagg import prg
from .params import CKKSConfig, headroom

EXACT_BITS = 52
"""SecAgg's decoder turns the modular sum into float64; sums below 2^52 stay exact integers."""
SEAL_NOISE_STD = 3.2
"""Standard deviation of SEAL's fresh-encryption error per coefficient (``seal::util::noise_standard_deviation``)."""
CHECK_SIGMAS = 8.0
"""The check tolerance in standard deviations of the honest decryption error (a per-slot false
refusal probability below 1e-15)."""
LABEL_CHECK = b"fedrlhf/ckks/v1/check-key"
LABEL_POSITIONS = b"fedrlhf/ckks/v1/check-positions"
LABEL_TAU = b"fedrlhf/ckks/v1/check-values"
LABEL_FLOOD = b"fedrlhf/ckks/v1/flooding"


def check_key(secret_context: bytes, key_id: bytes) -> bytes:
    """The 32-byte key every holder of the epoch's CKKS secret derives and the server cannot."""
    return HKDF(hashes.SHA256(), 32, salt=key_id, info=LABEL_CHECK).derive(secret_context)


def _seed(key: bytes, label: bytes, *parts: bytes | int) -> bytes:
    info = label + b"".join(p if isinstance(p, bytes) else int(p).to_bytes(8, "big", signed=True) for p in parts)
    return HKDF(hashes.SHA256(), prg.SEED_BYTES, salt=None, info=info).derive(key)


@dataclass(frozen=True)
class MaskPlan:
    """The fixed-point mask parameters of a run of at most ``max_clients`` clients.

    ``b``: masks and sums live modulo ``2^b``; ``2^(b-1)`` exceeds every possible aggregate
    ``max_clients * bound``, so the centred residue is the true sum. ``f``: fractional bits of the
    mask grid; ``b + f <= 52 - ceil(log2 max_clients)`` keeps SecAgg's float64 decoding exact.
    """

    max_clients: int
    bound: float
    b: int
    f: int
    scale_bits: int
    ring_degree: int
    check_fraction: float
    min_contributors: int | str
    flood_queries: int

    @property
    def total_bits(self) -> int:
        return self.b + self.f

    @property
    def modulus(self) -> int:
        return 1 << self.total_bits

    @property
    def grid(self) -> float:
        return 2.0**-self.f

    def checks(self, payload: int) -> int:
        """Check slots added to a payload of ``payload`` values (at least 16)."""
        return max(16, math.ceil(payload * self.check_fraction))

    def fresh_error(self) -> float:
        """RMS error of one fresh symmetric encryption per slot (real part): the canonical embedding
        of a degree-N error polynomial with std 3.2 plus the encoder's rounding, over the scale."""
        return math.sqrt(self.ring_degree / 2 * (SEAL_NOISE_STD**2 + 1 / 12)) / 2.0**self.scale_bits

    def tolerance(self, contributors: int) -> float:
        """The largest check-slot deviation accepted: ``CHECK_SIGMAS`` honest standard deviations of a
        sum of ``contributors`` fresh ciphertexts, plus float64 decoding of values up to the headroom."""
        peak = contributors * (2.0**self.b + self.bound)
        return CHECK_SIGMAS * self.fresh_error() * math.sqrt(contributors) + peak * 2.0**-50

    def flood_sigma(self, participants: int, payload: int) -> float:
        """Flooding standard deviation for an aggregate of at most ``participants`` over ``payload`` slots.

        Rényi-divergence argument (docs/ckks.md): the key-dependent part ``e`` of every released
        decryption is at most ``tol`` per slot (larger fails the check), so the released vectors of
        ``flood_queries`` decryptions with noise ``N(0, sigma^2)`` are within Rényi divergence of order
        2, ``D_2 = ||e||^2 / sigma^2 <= flood_queries * payload * tol^2 / sigma^2 = 1``, of the same
        vectors without ``e``, which carry no information about the key. By probability preservation
        an event (key recovery) of probability ``p`` there has probability at most ``sqrt(e * p)``.
        """
        return self.tolerance(participants) * math.sqrt(self.flood_queries * payload)

    def minimum(self, participants: int, threshold: int) -> int:
        """The fewest distinct contributors a client accepts in a round of ``participants``."""
        if self.min_contributors == "auto":
            return max(2, threshold)
        return int(self.min_contributors)


def plan(config: CKKSConfig, max_clients: int) -> MaskPlan:
    """Choose ``b`` and ``f`` for ``max_clients`` and check the CKKS headroom; raise
    :class:`AggregationConfigError` (a ValueError) naming the numbers."""
    if max_clients < 1:
        raise ValueError(f"a CKKS run needs at least one client, got {max_clients}")
    bound = float(config.max_abs)
    total = max_clients * bound
    b = math.floor(math.log2(total)) + 2  # 2^(b-1) >= 2^(floor(log2 total) + 1) > total
    total_bits = EXACT_BITS - math.ceil(math.log2(max(2, max_clients)))
    f = total_bits - b
    room = headroom(config)
    peak = max_clients * (2.0**b + bound)
    if peak >= room:
        raise AggregationConfigError(
            f"aggregation: {max_clients} clients x (mask 2^{b} + max_abs {bound:g}) = {peak:.4g} exceeds the "
            f"{room:.4g} that CKKS can decrypt (2^(data bits {config.data_bits} - scale_bits {config.scale_bits} - 1)); "
            "lower aggregation.max_abs or aggregation.scale_bits, or add a data prime to aggregation.coeff_mod_bit_sizes"
        )
    if f < 8:
        raise AggregationConfigError(
            f"aggregation: masks for {max_clients} clients with max_abs {bound:g} need {b} integer bits, leaving "
            f"{f} fractional bits of the {total_bits} exact ones; lower aggregation.max_abs"
        )
    return MaskPlan(
        max_clients, bound, b, f, config.scale_bits, config.poly_modulus_degree,
        config.check_fraction, config.min_contributors, config.flood_queries,
    )  # fmt: skip


# ------------------------------------------------------------------------------------- randomness
def sample_mask(length: int, total_bits: int) -> np.ndarray:
    """``length`` uniform integers in ``[0, 2^total_bits)`` from ``os.urandom`` (as int64)."""
    raw = np.frombuffer(os.urandom(8 * length), dtype="<u8").astype(np.uint64)
    return (raw & np.uint64((1 << total_bits) - 1)).astype(np.int64)


_POSITIONS: OrderedDict[bytes, np.ndarray] = OrderedDict()


def check_positions(key: bytes, session: bytes, rnd: int, slots: int, checks: int) -> np.ndarray:
    """Secret, sorted positions of the ``checks`` check slots among ``slots`` (a PRF permutation).

    Memoised per process like :func:`expected_checks` (a few entries, keyed by a hash of every
    input): every client of a key epoch derives the same positions, and the stable argsort of the
    ``slots`` PRF values cost each client of a host ~5 ms of a MovieLens round (issue 16); the
    result is the same array, computed once per host."""
    memo = hashlib.sha256(repr((key, session, rnd, slots, checks)).encode()).digest()
    hit = _POSITIONS.get(memo)
    if hit is None:
        order = np.argsort(prg.expand(_seed(key, LABEL_POSITIONS, session, rnd, slots), slots, np.uint64), kind="stable")
        hit = np.sort(order[:checks])
        _POSITIONS[memo] = hit
        while len(_POSITIONS) > 4:
            _POSITIONS.popitem(last=False)
    return hit.copy()


def check_values(key: bytes, session: bytes, rnd: int, client: int, checks: int, total_bits: int) -> np.ndarray:
    """Client ``client``'s secret check values ``tau`` in ``[0, 2^total_bits)`` (uint64)."""
    raw = prg.expand(_seed(key, LABEL_TAU, session, rnd, client), checks, np.uint64)
    return raw & np.uint64((1 << total_bits) - 1)


_EXPECTED: OrderedDict[bytes, np.ndarray] = OrderedDict()


def expected_checks(key: bytes, session: bytes, rnd: int, contributors: list[int], checks: int, total_bits: int) -> np.ndarray:
    """``sum_{i in contributors} tau_i mod 2^total_bits``: what the check slots of an honest aggregate hold.

    Memoised per host (a few entries, keyed by a hash of every input): the clients of one host that
    read the same aggregate share the sum instead of each computing n PRF expansions (n^2 per round)."""
    memo = hashlib.sha256(repr((key, session, rnd, tuple(contributors), checks, total_bits)).encode()).digest()
    hit = _EXPECTED.get(memo)
    if hit is None:
        hit = np.zeros(checks, dtype=np.uint64)
        for c in contributors:
            hit += check_values(key, session, rnd, c, checks, total_bits)  # uint64 wraps mod 2^64, a multiple of 2^total_bits
        hit &= np.uint64((1 << total_bits) - 1)
        _EXPECTED[memo] = hit
        while len(_EXPECTED) > 4:
            _EXPECTED.popitem(last=False)
    return hit.copy()


def flooding(key: bytes, aggregate: bytes, size: int, sigma: float) -> np.ndarray:
    """``N(0, sigma^2)`` noise, a PRF of the check key and the aggregate's bytes (Box–Muller on
    AES-CTR output: 53-bit uniforms in (0, 1])."""
    digest = hashlib.sha256(aggregate).digest()
    half = (size + 1) // 2
    raw = prg.expand(_seed(key, LABEL_FLOOD, digest), 2 * half, np.uint64) >> np.uint64(11)
    u = (raw.astype(np.float64) + 1.0) * 2.0**-53
    u1, u2 = u[:half], u[half:]
    radius = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])
    return sigma * z[:size]


def centred(values: np.ndarray, modulus: float) -> np.ndarray:
    """``values mod modulus`` in ``[-modulus/2, modulus/2)``."""
    return np.mod(values + modulus / 2, modulus) - modulus / 2
