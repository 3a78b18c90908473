"""The privacy ledger: a persistent, crash-safe record of every DP release of a run, per client.

Layout (inside the run directory)::

    ledger/plan.json          what was promised: mode, accountant, ε budget, δ (checked on resume)
    ledger/client-<id>.json   that client's releases, one entry per round it took part in

Each entry records the mechanism, its noise, sampling rate, steps, sensitivity, the ε the client
has spent *after* it, and the SHA-256 of the exact bytes released. A client's file is rewritten
atomically (write aside, fsync, rename, fsync the directory), so after a crash it holds either
the old or the new list, never half of one.

Semantics (what makes ``--resume`` safe):

* An entry is written **before** the update leaves the client. A crash after the write may or may
  not have let the update out, so the entry stays counted, always.
* Entries are keyed by ``(client, round)``. Recording the same key again with the **same digest**
  (the identical release, replayed after a crash: see :mod:`.replay`) is a no-op, so a re-run
  round is never counted twice. Recording it with a **different** digest is refused
  (:class:`LedgerConflict`): that would be a second, fresh release of the same round, which must
  not happen silently.
* Nothing ever deletes an entry or resets ε; a fresh run refuses to start on an existing ledger.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, PrivacyError
from ..rundir import atomic_write_json

LEDGER_VERSION = 1


class LedgerError(PrivacyError):
    """The ledger cannot be used as asked (corrupt, or for another plan): no release may follow."""


class LedgerRefused(LedgerError, InputError):
    """The ledger refuses how it was asked to be used (a fresh run over an existing ledger, a resume
    with another privacy plan): bad input, exit status 2."""

    exit_status = InputError.exit_status


class LedgerMissing(LedgerRefused, FileNotFoundError):
    """No ledger where one was expected (``fedrlhf ledger`` of a run without DP, a wrong path)."""


class LedgerConflict(LedgerError):
    """A different release was offered for a (client, round) that already has one."""


@dataclass(frozen=True)
class LedgerEntry:
    """One DP release by one client in one round."""

    client: int
    round: int
    mechanism: str
    """``dp-sgd`` (record level), ``gaussian`` or ``skellam`` (client level)."""
    noise_multiplier: float
    """Gaussian noise std / sensitivity (for ``skellam``: sqrt(variance) / L2 sensitivity)."""
    sample_rate: float
    steps: int
    sensitivity: float
    epsilon_after: float
    delta: float
    digest: str
    noise: str = "local"
    """Where the noise is added: ``local`` (DP-SGD), ``distributed`` (shares) or ``central`` (server)."""
    params: dict[str, float] = field(default_factory=dict)
    """Mechanism-specific extras (e.g. Skellam variance and L1/L2 sensitivities)."""
    written_at: str = ""

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], source: Path) -> LedgerEntry:
        try:
            return cls(
                client=int(raw["client"]),
                round=int(raw["round"]),
                mechanism=str(raw["mechanism"]),
                noise_multiplier=float(raw["noise_multiplier"]),
                sample_rate=float(raw["sample_rate"]),
                steps=int(raw["steps"]),
                sensitivity=float(raw["sensitivity"]),
                epsilon_after=float(raw["epsilon_after"]),
                delta=float(raw["delta"]),
                digest=str(raw["digest"]),
                noise=str(raw.get("noise", "local")),
                params={k: float(v) for k, v in dict(raw.get("params", {})).items()},
                written_at=str(raw.get("written_at", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise LedgerError(f"{source}: malformed ledger entry {raw!r} ({exc})") from exc


class PrivacyLedger:
    """Per-run, per-client ledger in one directory (see the module docstring for the semantics)."""

    def __init__(self, directory: Path, header: Mapping[str, Any], *, resume: bool) -> None:
        self.directory = Path(directory)
        self.header = {"version": LEDGER_VERSION, **header}
        plan_path = self.directory / "plan.json"
        if resume:
            if not plan_path.exists():
                if self.directory.exists() and any(self.directory.glob("client-*.json")):
                    raise LedgerError(f"{self.directory}: client entries without plan.json; refusing to guess the budget")
                self.directory.mkdir(parents=True, exist_ok=True)
                atomic_write_json(plan_path, self.header)
            else:
                saved = self._read_json(plan_path)
                if saved != json.loads(json.dumps(self.header)):
                    raise LedgerRefused(
                        f"{plan_path}: the ledger was written for {saved}, but the resumed run asks for {self.header}; "
                        "a resumed run must keep its privacy plan"
                    )
        else:
            if plan_path.exists() or (self.directory.exists() and any(self.directory.glob("client-*.json"))):
                raise LedgerRefused(f"{self.directory} already holds a ledger; a new run never reuses one (use --resume)")
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write_json(plan_path, self.header)
        self._entries: dict[int, dict[int, LedgerEntry]] = {}
        for path in sorted(self.directory.glob("client-*.json")):
            for e in self._load_client(path):
                self._entries.setdefault(e.client, {})[e.round] = e

    @staticmethod
    def _read_json(path: Path) -> Any:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise LedgerError(f"{path}: unreadable ledger file ({exc})") from exc

    def _load_client(self, path: Path) -> list[LedgerEntry]:
        raw = self._read_json(path)
        if not isinstance(raw, dict) or not isinstance(raw.get("entries"), list):
            raise LedgerError(f"{path}: expected an object with an 'entries' list")
        return [LedgerEntry.from_mapping(e, path) for e in raw["entries"]]

    # ------------------------------------------------------------------ reading
    def entries(self, client: int) -> list[LedgerEntry]:
        """The client's releases in round order."""
        return [self._entries[client][r] for r in sorted(self._entries.get(client, {}))]

    def entry(self, client: int, round: int) -> LedgerEntry | None:
        return self._entries.get(client, {}).get(round)

    def clients(self) -> list[int]:
        return sorted(self._entries)

    def spent(self, client: int) -> float:
        """ε the client has spent (0 before its first release)."""
        es = self.entries(client)
        return max((e.epsilon_after for e in es), default=0.0)

    def __iter__(self) -> Iterator[LedgerEntry]:
        for c in self.clients():
            yield from self.entries(c)

    # ------------------------------------------------------------------ writing
    def record(self, entry: LedgerEntry) -> LedgerEntry:
        """Durably record ``entry``; idempotent for an identical release (returns the stored entry)."""
        existing = self.entry(entry.client, entry.round)
        if existing is not None:
            if existing.digest == entry.digest:
                return existing
            raise LedgerConflict(
                f"client {entry.client} already released a different update in round {entry.round} "
                f"(digest {existing.digest[:12]}…, now {entry.digest[:12]}…); a second release of a round is refused"
            )
        if not entry.written_at:
            entry = LedgerEntry(**{**asdict(entry), "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        rows = {**self._entries.get(entry.client, {}), entry.round: entry}
        atomic_write_json(
            self.directory / f"client-{entry.client}.json",
            {"client": entry.client, "entries": [asdict(rows[r]) for r in sorted(rows)]},
        )
        self._entries[entry.client] = rows
        return entry


def read_ledger(directory: Path) -> tuple[dict[str, Any], dict[int, list[LedgerEntry]]]:
    """Read a ledger without opening it for writing (for ``fedrlhf ledger`` and audits)."""
    directory = Path(directory)
    plan_path = directory / "plan.json"
    if not plan_path.exists():
        raise LedgerMissing(f"no privacy ledger at {directory} (expected {plan_path})")
    header = PrivacyLedger._read_json(plan_path)
    out: dict[int, list[LedgerEntry]] = {}
    for path in sorted(directory.glob("client-*.json")):
        raw = PrivacyLedger._read_json(path)
        if not isinstance(raw, dict) or not isinstance(raw.get("entries"), list):
            raise LedgerError(f"{path}: expected an object with an 'entries' list")
        for e in raw["entries"]:
            entry = LedgerEntry.from_mapping(e, path)
            out.setdefault(entry.client, []).append(entry)
    for c in out:
        out[c].sort(key=lambda e: e.round)
    return header, out
