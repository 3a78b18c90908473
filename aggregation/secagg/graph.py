"""The masking graph: who shares masks and secret shares with whom (SecAgg+, Bell et al., CCS 2020).

Bell et al. replace SecAgg's complete graph by a sparse one of degree k = O(log n): each client
masks with, and secret-shares to, only its k neighbours, so client work drops from O(n d) to
O(k d) and server unmasking from O(n^2) to O(n k). We use their Harary graph H(k, n) (ring with
offsets ±1..±k/2, plus the "diameter" edge when k is odd, which makes it k-connected) over a
*random* relabelling of the participants.

The relabelling is derived from the round's public values (session id, round, participant list)
with HKDF, so every client computes the same graph by itself and the server cannot hand a victim
a neighbourhood made of its own colluders. (A server that can grind session ids could still try
many graphs; the session id is fixed per run before clients are selected.)

``k >= n - 1`` gives the complete graph: classic SecAgg (Bonawitz et al., CCS 2017).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .prg import expand


def _permutation(session_id: bytes, round_index: int, participants: Sequence[int]) -> np.ndarray:
    """A uniformly random ordering of ``participants`` keyed by the public round values.

    Sorting by 64-bit tags from a keyed PRG gives a uniform permutation up to tag collisions
    (probability < n^2 / 2^65); ties are broken by id, so every party gets the same order.
    """
    ids = np.array(sorted(participants), dtype=np.int64)
    digest = hashlib.sha256(ids.astype(">i8").tobytes()).digest()
    info = b"fedrlhf/secagg/v1/graph" + struct.pack(">q", round_index) + digest
    seed = HKDF(hashes.SHA256(), 32, salt=session_id, info=info).derive(b"graph")
    tags = expand(seed, ids.size, np.uint64)
    return ids[np.lexsort((ids, tags))]


def _offsets(n: int, k: int) -> list[int]:
    """Ring offsets of H(k, n) for even k (the odd-k diameter edge is added separately)."""
    return [o for off in range(1, k // 2 + 1) for o in (off, -off)]


def neighbours(session_id: bytes, round_index: int, participants: Sequence[int], k: int) -> dict[int, frozenset[int]]:
    """Every participant's neighbour set in the round's Harary graph of degree ``min(k, n-1)``."""
    order = _permutation(session_id, round_index, participants)
    return {int(order[p]): _at(order, p, k) for p in range(order.size)}


def neighbours_of(session_id: bytes, round_index: int, participants: Sequence[int], k: int, client_id: int) -> frozenset[int]:
    """One participant's neighbours (what a client computes for itself: O(n) hashing, O(k) graph)."""
    order = _permutation(session_id, round_index, participants)
    pos = np.flatnonzero(order == client_id)
    if pos.size != 1:
        raise ValueError(f"client {client_id} is not a participant")
    return _at(order, int(pos[0]), k)


def _at(order: np.ndarray, p: int, k: int) -> frozenset[int]:
    n = order.size
    k = min(k, n - 1)
    if k >= n - 1:
        return frozenset(int(c) for c in order if c != order[p])
    out = {int(order[(p + o) % n]) for o in _offsets(n, k)}
    if k % 2 == 1:
        half = n // 2
        # Diameter edges a <-> a + n//2 for a < ceil(n/2) (H(k, n) for odd k; one extra edge when n is odd).
        if p < (n + 1) // 2:
            out.add(int(order[(p + half) % n]))
        if p >= half and (p - half) < (n + 1) // 2:
            out.add(int(order[p - half]))
    out.discard(int(order[p]))
    return frozenset(out)
