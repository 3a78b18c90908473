"""White-box gradient canaries for auditing a run in one training run (``privacy.audit_canaries: m``).

Why: a DP claim is a statement about the mechanism *clip → noise*, so the strongest test of it
inserts canaries where the mechanism sees its inputs, in gradient (update) space, and reads them
back from what is released (Steinke, Nasr & Jagielski 2023, "Privacy auditing with one (1) training
run", §6 white-box; Nasr et al. 2023, "Tight auditing of differentially private machine learning",
Dirac canaries). Canary ``j`` is the fixed vector ``s_j · C · e_{c_j}``: a single coordinate
``c_j`` of the flat update (a *Dirac* canary) with a sign ``s_j ∈ {±1}`` and the clip norm ``C``
as its length, i.e. the largest contribution one protected unit may make. Each canary is kept
with a fair coin; a kept canary is added, after clipping and before the noise, to the update of
the client that holds it, in every round that client takes part in
(:meth:`fedrlhf_secure.federation.participant.Participant.release`). Under client-level DP each
canary is thus one more clipped "client update" in the noised sum, and the run's ε covers it
exactly as it covers a real client (the canaries are orthogonal, so one canary moves the sum by
exactly ``C``).

Who knows what:

* the **placement** (coordinates, signs, holders) is public: drawn from the run seed, the same on
  every host of a federation;
* the **coins** are secret: drawn by the holder's host from a secret generator
  (:mod:`.randomness`) and written beside that host's ledger
  (``<run>/audit-canaries/client-<id>.npz``); only the auditor, who reads them after the run, uses
  them. A resumed run reads them back instead of drawing new ones.

**Record level** (``privacy.mode: record``): the noise is added inside every DP-SGD step, so the
canaries go in there (:class:`~.dpsgd.RecordCanaries`, :class:`~.dpsgd.AuditBlock`): canary j is a
record whose clipped gradient is ``±C·e_{c_j}`` (C = ``max_grad_norm``), Poisson-sampled into each
step at the plan's rate q like every record, added to the step's sum of clipped gradients before
Opacus adds the noise. Its two worlds are the record and its mirror image (``+s_j`` kept, ``-s_j``
dropped): the replace-one accountant's dominating pair, so the run's ε covers each canary as one
rating.

**Where** (``privacy.audit_coordinates``): ``block`` (the default) puts every canary on its own
coordinate of a dedicated **audit block** (:data:`AUDIT_BLOCK`, m coordinates appended to the
shared parameters by :func:`with_audit_block`): the model never reads it, no record's or client's
gradient moves it, but the clip → noise → aggregate → release path treats it like every other
coordinate. ``model`` (client level only) puts them on the model's own plain-mean coordinates,
where the real updates confound them (docs/audits.md has the measurements). What a block canary
tests and what it does not: docs/audits.md.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..configtypes import ConfigError, InputError
from .randomness import secret_numpy_rng

logger = logging.getLogger(__name__)

CANARY_DIR = "audit-canaries"
PLAN_FILE = "plan.json"
_PLACEMENT_TAG = 0xCA7A
AUDIT_BLOCK = "audit.canary_block"
"""The shared parameter that holds the audit block (``privacy.audit_coordinates: block``)."""


def audit_block_size(config) -> int:
    """Coordinates of the audit block a run's shared parameters get (0: none)."""
    p = config.privacy
    m = p.audit_canary_count()
    return m if m and p.audit_coordinates == "block" else 0


@dataclass(frozen=True)
class CanaryPlacement:
    """The public part: ``m`` distinct coordinates of the flat update's delta part, a sign and a holder each."""

    coordinates: np.ndarray
    signs: np.ndarray
    holders: np.ndarray
    norm: float
    seed: int
    dim: int
    mechanism: str = "client"
    """``client`` (added after client-level clipping; dropped canaries are absent) or ``record``
    (inside DP-SGD; a dropped canary is the kept one's mirror image, see :class:`~.dpsgd.RecordCanaries`)."""

    @property
    def size(self) -> int:
        return int(self.coordinates.size)


def place_canaries(
    m: int, ranges: Sequence[Sequence[int]], dim: int, client_ids: Sequence[int], norm: float, seed: int, mechanism: str = "client"
) -> CanaryPlacement:
    """Canary ``j`` sits on coordinate ``c_j`` (distinct, uniform over the coordinates in ``ranges``:
    ``[start, stop)`` spans of the ``dim`` shared-parameter coordinates), with sign ``s_j`` and holder
    ``client_ids[j mod n]`` (sorted ids, so every host of a federation agrees); drawn from ``seed``
    (the run seed: the placement is public, the coins are not)."""
    eligible = np.concatenate([np.arange(int(a), int(b), dtype=np.int64) for a, b in ranges]) if ranges else np.zeros(0, np.int64)
    if not 0 < m <= eligible.size:
        raise ValueError(f"need 0 < audit canaries ({m}) <= eligible coordinates ({eligible.size})")
    if eligible.size and (eligible.min() < 0 or eligible.max() >= dim):
        raise ValueError(f"canary coordinates must lie in [0, {dim})")
    ids = np.asarray(sorted(int(c) for c in client_ids), dtype=np.int64)
    if ids.size == 0:
        raise ValueError("canaries need at least one client to hold them")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _PLACEMENT_TAG, int(m)]))
    coords = eligible[rng.choice(eligible.size, size=m, replace=False)]
    signs = np.where(rng.random(m) < 0.5, -1, 1).astype(np.int8)
    holders = ids[np.arange(m) % ids.size]
    return CanaryPlacement(coords, signs, holders, float(norm), int(seed), int(dim), mechanism)


def linear_ranges(codec) -> list[tuple[int, int]]:
    """The spans of the flat update whose aggregate is a plain mean (the update codec divides them by
    the total weight): every shared parameter except ``sparse_rows`` ones averaged over the clients
    that touched each row (``federation.sparse_rows: touched``). A Dirac canary on such a row would be
    divided by a touch count the released model does not show, or dropped with an untouched row."""
    sparse = {e.name for e in codec.sparse}
    out, pos = [], 0
    for e in codec.spec.entries:
        if e.name not in sparse:
            if out and out[-1][1] == pos:
                out[-1] = (out[-1][0], pos + e.size)
            else:
                out.append((pos, pos + e.size))
        pos += e.size
    return out


def block_ranges(codec) -> list[tuple[int, int]]:
    """The span of :data:`AUDIT_BLOCK` in the flat update (empty when the run has no block)."""
    pos = 0
    for e in codec.spec.entries:
        if e.name == AUDIT_BLOCK:
            return [(pos, pos + e.size)]
        pos += e.size
    return []


class GradientCanaries:
    """The canaries held by one host's clients, with their secret coins; :meth:`insert` is the pipeline step."""

    def __init__(self, placement: CanaryPlacement, included: dict[int, np.ndarray], block_start: int = 0) -> None:
        self.placement = placement
        self.block_start = int(block_start)
        self._mine: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for cid, coins in included.items():
            sel = np.flatnonzero(placement.holders == cid)
            coins = np.asarray(coins, dtype=bool)
            if coins.shape != sel.shape:
                raise ValueError(f"client {cid}: {coins.size} canary coins for {sel.size} canaries")
            if placement.mechanism == "record":  # every canary is a record: s_j when kept, its mirror image when dropped
                signs = placement.signs[sel].astype(np.float64) * np.where(coins, 1.0, -1.0)
                self._mine[int(cid)] = (placement.coordinates[sel], signs * placement.norm)
            else:
                kept = sel[coins]
                self._mine[int(cid)] = (placement.coordinates[kept], placement.signs[kept].astype(np.float64) * placement.norm)

    def for_dpsgd(self, client_id: int, settings):
        """Record level: ``settings`` carrying this client's canaries, as offsets into the audit block."""
        from .dpsgd import RecordCanaries

        if self.placement.mechanism != "record" or settings is None:
            return settings
        coords, values = self._mine.get(int(client_id), (np.zeros(0, np.int64), np.zeros(0)))
        return replace(settings, canaries=RecordCanaries(coords - self.block_start, values.astype(np.float32)))

    def insert(self, client_id: int, round: int, clipped: np.ndarray) -> np.ndarray:
        """Client level: ``clipped + Σ_{kept j held by client_id} s_j C e_{c_j}`` (a copy; ``round`` only
        for the log). Record level: ``clipped`` (the canaries went in inside DP-SGD, :meth:`for_dpsgd`)."""
        if self.placement.mechanism == "record":
            return clipped
        coords, values = self._mine.get(int(client_id), (None, None))
        if coords is None or coords.size == 0:
            return clipped
        if int(coords.max()) >= clipped.size:
            raise ValueError(f"canary coordinate {int(coords.max())} outside the update of size {clipped.size}")
        out = np.array(clipped, dtype=np.float32, copy=True)
        out[coords] += values.astype(np.float32)
        logger.debug("client %d round %d: %d audit canaries inserted before the noise", client_id, round, coords.size)
        return out


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _client_file(folder: Path, cid: int) -> Path:
    return folder / f"client-{int(cid)}.npz"


def build_canaries(
    config, all_clients: Sequence[int], own_clients: Sequence[int], codec, ledger_dir: Path | None, resume: bool
) -> GradientCanaries | None:
    """The canaries of ``privacy.audit_canaries`` for the clients of one host, or None when it is 0.

    Draws the host's coins from a secret generator and writes them (fsync'd) into
    ``<ledger_dir>/../audit-canaries/`` before any update leaves; reads them back when they exist
    (a resumed run, a worker process) and refuses a missing file for a client that already has
    ledger entries (new coins would void the audit of the rounds it released). ``resume`` is
    accepted for the caller's symmetry; worker processes of a fresh run are set up as resuming."""
    p = config.privacy
    m = p.audit_canary_count()
    if m == 0:
        return None
    mechanism = p.mode
    if mechanism not in ("client", "record"):
        raise ConfigError(
            f"audit canaries need a DP mode (client or record), privacy.mode is {p.mode!r}", source=config.source, key="privacy.mode"
        )
    dim = int(codec.spec.size)
    if p.audit_coordinates == "block":
        ranges = block_ranges(codec)
        if sum(b - a for a, b in ranges) != m:
            raise ConfigError(
                f"{m} canaries but the update's audit block ({AUDIT_BLOCK}) has {sum(b - a for a, b in ranges)} coordinates "
                "(the task must be built with fedrlhf_secure.federation.participant.build_task)",
                source=config.source,
                key="privacy.audit_canaries",
            )
    else:
        ranges = linear_ranges(codec)
        room = sum(b - a for a, b in ranges)
        if m > room:
            raise ConfigError(
                f"{m} canaries but the update has only {room} coordinates whose aggregate is a plain mean"
                + (" (federation.sparse_rows: all adds the sparse rows)" if codec.sparse else "")
                + "; privacy.audit_coordinates: block has room for any m",
                source=config.source,
                key="privacy.audit_canaries",
            )
    norm = float(p.max_grad_norm if mechanism == "record" else p.clip_norm)
    if ledger_dir is None:
        raise InputError("privacy.audit_canaries needs a ledger directory to keep the canary coins in")
    placement = place_canaries(m, ranges, dim, all_clients, norm, config.seed, mechanism)
    folder = Path(ledger_dir).parent / CANARY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    plan = {
        "canaries": m,
        "dim": dim,
        "ranges": [[int(a), int(b)] for a, b in ranges],
        "norm": norm,
        "seed": int(config.seed),
        "client_ids": sorted(int(c) for c in all_clients),
        "mechanism": mechanism,
        "coordinates": p.audit_coordinates,
    }
    plan_path = folder / PLAN_FILE
    if plan_path.is_file():
        old = json.loads(plan_path.read_text())
        if old != plan:
            raise InputError(f"{plan_path} describes other canaries ({old}) than this run's ({plan})")
    else:
        _write_atomic(plan_path, json.dumps(plan, sort_keys=True).encode())
    included: dict[int, np.ndarray] = {}
    for cid in own_clients:
        n_own = int((placement.holders == int(cid)).sum())
        path = _client_file(folder, cid)
        if path.is_file():
            with np.load(path) as f:
                coins = np.asarray(f["included"], dtype=bool)
        elif n_own and (Path(ledger_dir) / f"client-{int(cid)}.json").exists():
            # the client has released updates carrying its canaries: new coins would void their audit
            raise InputError(f"client {cid} has ledger entries but {path} (its canary coins) is missing")
        else:
            coins = secret_numpy_rng().random(n_own) < 0.5
            sel = np.flatnonzero(placement.holders == int(cid))
            buf = io.BytesIO()
            np.savez(buf, included=coins, index=sel.astype(np.int64))
            _write_atomic(path, buf.getvalue())
        included[int(cid)] = coins
    return GradientCanaries(placement, included, ranges[0][0] if p.audit_coordinates == "block" else 0)


def read_canaries(run_dir: Path) -> tuple[CanaryPlacement, np.ndarray] | None:
    """For the auditor, after the run: the placement and every canary's coin (None: no canaries).

    Refuses (:class:`InputError`) a run whose canary files are incomplete: an audit on the canaries
    that happen to remain would not be the audit the run was configured for."""
    folder = Path(run_dir) / CANARY_DIR
    plan_path = folder / PLAN_FILE
    if not plan_path.is_file():
        return None
    plan = json.loads(plan_path.read_text())
    m = int(plan["canaries"])
    placement = place_canaries(
        m, plan["ranges"], int(plan["dim"]), plan["client_ids"], float(plan["norm"]), int(plan["seed"]), plan.get("mechanism", "client")
    )
    included = np.zeros(m, dtype=bool)
    seen = np.zeros(m, dtype=bool)
    for cid in sorted(set(int(c) for c in placement.holders)):
        path = _client_file(folder, cid)
        if not path.is_file():
            raise InputError(f"{path} is missing: the coins of client {cid}'s canaries (the audit needs all {m})")
        with np.load(path) as f:
            idx = np.asarray(f["index"], dtype=np.int64)
            coins = np.asarray(f["included"], dtype=bool)
        if not np.array_equal(idx, np.flatnonzero(placement.holders == cid)) or coins.shape != idx.shape:
            raise InputError(f"{path} does not hold the canaries the plan gives client {cid}")
        included[idx] = coins
        seen[idx] = True
    if not seen.all():
        raise InputError(f"{folder}: coin files cover {int(seen.sum())} of the {m} planned canaries")
    return placement, included
