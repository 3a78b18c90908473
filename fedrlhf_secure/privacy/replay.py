"""Replay a round's DP release verbatim after a crash instead of drawing fresh noise.

Why: a release that may already have left the client is paid for (the ledger keeps it). If the
resumed run re-ran the round with *fresh* noise, an observer of both attempts could average the
two releases and the round would really cost twice. So each client's latest release (its noisy
vector, weight and any integer noise share) is stored, fsync'd, *before* its ledger entry is
written, and a re-run of the same round sends exactly the same bytes again — which the ledger
recognises by digest and does not count twice.

The store is resume state: it lives under the run's ``checkpoint/`` (removed when the run
completes) and keeps only each client's most recent round. In a deployment it is the client's own
disk, like its ledger.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from safetensors.numpy import save as save_tensors

from ..rundir import atomic_write_bytes
from .plan import Release


def release_digest(client: int, round: int, release: Release) -> str:
    """SHA-256 over everything the client sends for this round (vector, weight, integer noise)."""
    h = hashlib.sha256()
    h.update(struct.pack("<qqd", client, round, float(release.weight)))
    h.update(np.ascontiguousarray(release.vector, dtype=np.float32).tobytes())
    if release.integer_noise is not None:
        h.update(b"integer_noise")
        h.update(np.ascontiguousarray(release.integer_noise).tobytes())
    return h.hexdigest()


class ReleaseStore:
    """One file per client holding its most recent release (round, vector, weight, integer noise)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def _path(self, client: int) -> Path:
        return self.directory / f"client-{client}.safetensors"

    def save(self, client: int, round: int, release: Release) -> None:
        tensors = {
            "vector": np.ascontiguousarray(release.vector, dtype=np.float32),
            "round": np.asarray([round], dtype=np.int64),
            "weight": np.asarray([release.weight], dtype=np.float64),
        }
        if release.integer_noise is not None:
            tensors["integer_noise"] = np.ascontiguousarray(release.integer_noise, dtype=np.int64)
        # write aside, fsync, rename, fsync the directory: the release must be on disk before its ledger entry
        atomic_write_bytes(self._path(client), save_tensors(tensors))

    def load(self, client: int, round: int) -> Release | None:
        """The stored release of ``client`` for ``round``, or None."""
        path = self._path(client)
        if not path.exists():
            return None
        t = load_file(str(path))
        if int(t["round"][0]) != round:
            return None
        # "kw/integer_noise": the name runs interrupted before the participant rewrite stored it under
        return Release(t["vector"], float(t["weight"][0]), t.get("integer_noise", t.get("kw/integer_noise")))
