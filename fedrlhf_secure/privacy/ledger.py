"""The privacy ledger: a persistent, crash-safe, tamper-evident record of every DP release of a run, per client.

Layout (inside the run directory, or a deployment node's state directory)::

    ledger/plan.json          what was promised: mode, accountant, ε budget, δ (checked on resume)
    ledger/client-<id>.json   that client's releases, one entry per round it took part in
    ledger/manifest.json      per client: its file, how many entries it holds and the head of their
                              hash chain (SHA-256), plus the SHA-256 of plan.json

Each entry records the mechanism, its noise, sampling rate, steps, sensitivity, the ε the client
has spent *after* it, and the SHA-256 of the exact bytes released. Every file is rewritten
atomically (write aside, fsync, rename, fsync the directory: :func:`~fedrlhf_secure.rundir.atomic_write_bytes`),
so after a crash it holds either the old or the new content, never half of one. A fresh ledger is
built in a hidden directory and renamed into place, so ``ledger/`` exists complete (plan and an
empty manifest) or not at all.

Semantics (what makes ``--resume`` safe):

* An entry is written **before** the update leaves the client. A crash after the write may or may
  not have let the update out, so the entry stays counted, always.
* Entries are keyed by ``(client, round)``. Recording the same key again with the **same digest**
  (the identical release, replayed after a crash: see :mod:`.replay`) is a no-op, so a re-run
  round is never counted twice. Recording it with a **different** digest is refused
  (:class:`LedgerConflict`): that would be a second, fresh release of the same round, which must
  not happen silently.
* Nothing ever deletes an entry or resets ε; a fresh run refuses to start on an existing ledger.

Why a manifest (fail closed). Without one, a ledger cannot tell "this client never released" from
"this client's file was deleted": deleting ``client-3.json``, renaming it, emptying its entries or
removing ``ledger/`` altogether used to resume as zero spend (``rm -rf ledger/`` of an interrupted
run then reported ε = 3.56 from 76 releases against the true 4.00 from 95). The manifest commits to
each client's entries: its count and the head of a hash chain ``h_0 = SHA-256("fedrlhf-ledger-v1" ‖
client)``, ``h_i = SHA-256(h_{i-1} ‖ canonical bytes of entry i)`` over the entries in round order.
Reopening a ledger (:meth:`PrivacyLedger.__init__` with ``resume=True``, :func:`read_ledger`,
``fedrlhf ledger``) recomputes every chain and **refuses** (:class:`LedgerIncomplete`, naming the
file) a missing ledger directory, plan or manifest, a client file the manifest lists but the
directory lacks (deleted or renamed), one holding fewer entries than the manifest counts (emptied,
truncated), or one whose chain does not reach the manifest's head (an entry altered or swapped).
A ledger replaced as a whole by an older, self-consistent copy (or a fresh empty one) passes that
check; the run's checkpoint therefore records each client's count and chain head
(:func:`ledger_commitment`) and a resume refuses a ledger holding less (:func:`check_extends`).
A plain file system cannot stop someone who rewrites the entries *and* the manifest consistently;
``fedrlhf ledger`` then still recomputes every ε from the mechanism parameters with the accountant
instead of trusting the stored figure. What the manifest guarantees is that no *loss* of entries
(the accidental case, and the one that under-reports ε) goes unnoticed.

Commit order, and why the manifest never undercounts a committed release. :meth:`PrivacyLedger.record`
writes the client's file first and the manifest second, both under an exclusive lock on
``ledger/.lock`` (several worker processes of one run share a ledger; each rewrites the manifest
from its on-disk state, so no update is lost). A release counts as committed when ``record``
returns, and only then does it leave the client (:mod:`fedrlhf_secure.federation.participant`, step
3). So a crash between the two writes leaves a client file holding exactly one entry more than the
manifest counts, for a release that never left. Reopening recognises exactly that shape (removing
one entry gives the manifest's chain head; for a client not yet listed, a file with a single entry)
and rolls the manifest forward to include the extra entry rather than dropping it: the spend on
record is then an over-count by at most that one unreleased round, never an under-count. Writing
the manifest first would instead leave a manifest counting an entry that no file holds, which
cannot be told apart from a deleted entry without also keeping the entry in the manifest; the
order chosen needs no such second copy.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, PrivacyError
from ..rundir import atomic_write_bytes, atomic_write_json, fsync_dir

LEDGER_VERSION = 1
MANIFEST_VERSION = 1
PLAN = "plan.json"
MANIFEST = "manifest.json"
LOCK = ".lock"
_CLIENT_FILE = re.compile(r"^client-(0|[1-9][0-9]*)\.json$")
logger = logging.getLogger(__name__)


class LedgerError(PrivacyError):
    """The ledger cannot be used as asked (corrupt, or for another plan): no release may follow."""


class LedgerIncomplete(LedgerError):
    """Entries the ledger committed to are gone or altered (a missing, renamed, emptied, truncated or
    tampered client file; a missing manifest, plan or ledger directory). Resuming would count the
    lost releases as zero spend, so nothing may follow: a privacy integrity failure, exit status 1."""


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
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise LedgerError(f"{source}: malformed ledger entry {raw!r} ({exc})") from exc


# ---------------------------------------------------------------------------------------------
# The hash chain
# ---------------------------------------------------------------------------------------------


def canonical_entry_bytes(entry: LedgerEntry) -> bytes:
    """The bytes an entry is hashed as: sorted-key compact JSON (floats in their shortest round-trip
    form, so an entry read back from its file hashes to the same bytes it was written from)."""
    return json.dumps(asdict(entry), sort_keys=True, separators=(",", ":"), allow_nan=True).encode("utf-8")


def chain_head(client: int, entries: list[LedgerEntry]) -> str:
    """Head of the client's hash chain over ``entries`` (in the order given: round order on disk)."""
    h = hashlib.sha256(b"fedrlhf-ledger-v1\x00" + str(int(client)).encode()).digest()
    for e in entries:
        h = hashlib.sha256(h + canonical_entry_bytes(e)).digest()
    return h.hex()


def _plan_sha256(plan: Any) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()).hexdigest()


def _write_manifest(path: Path, manifest: Mapping[str, Any]) -> None:
    """Compact JSON (the C encoder: the manifest is rewritten on every commit and, with 943 clients,
    indenting it cost more than its fsync), one client record per line so a human can still read it."""
    clients = manifest.get("clients", {})
    lines = [
        json.dumps(str(c)) + ": " + json.dumps(rec, sort_keys=True, separators=(",", ":"))
        for c, rec in sorted(clients.items(), key=lambda kv: int(kv[0]))
    ]
    head = {k: v for k, v in manifest.items() if k != "clients"}
    text = json.dumps(head, sort_keys=True)[:-1] + ', "clients": {' + ("\n" if lines else "") + ",\n".join(lines) + "}}\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def client_file(client: int) -> str:
    return f"client-{int(client)}.json"


# ---------------------------------------------------------------------------------------------
# Verification (shared by resume, read_ledger and `fedrlhf ledger`)
# ---------------------------------------------------------------------------------------------


@dataclass
class LedgerCheck:
    """What :func:`check_ledger` found: the entries, and every way they depart from the manifest."""

    directory: Path
    header: dict[str, Any]
    entries: dict[int, list[LedgerEntry]]
    problems: list[str]
    """Each names the file and what is wrong with it; empty when the ledger is whole."""
    manifest: dict[str, Any]
    pending: dict[int, str] = field(default_factory=dict)
    """Clients whose file holds the one entry a crash kept out of the manifest (client -> new head)."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_if_broken(self) -> None:
        if self.problems:
            raise LedgerIncomplete(
                f"{self.directory}: the privacy ledger is incomplete or altered, so the ε already spent is unknown; refusing to "
                "continue (restore the ledger from a backup; a run cannot resume without it):\n  " + "\n  ".join(self.problems)
            )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LedgerError(f"{path}: unreadable ledger file ({exc})") from exc


def _load_client_file(path: Path) -> list[LedgerEntry]:
    raw = _read_json(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("entries"), list):
        raise LedgerError(f"{path}: expected an object with an 'entries' list")
    return [LedgerEntry.from_mapping(e, path) for e in raw["entries"]]


def check_ledger(directory: Path) -> LedgerCheck:
    """Read the ledger in ``directory`` and check every client file against the manifest.

    Raises :class:`LedgerIncomplete` when the directory, plan or manifest is missing (nothing can be
    checked then) and :class:`LedgerError` for a file that is not valid JSON; everything else found
    wrong is collected in :attr:`LedgerCheck.problems`, each naming its file.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise LedgerIncomplete(
            f"{directory}: the privacy ledger directory is missing; without it the ε its clients already spent is unknown "
            "(a run that released anything under DP cannot resume without its ledger)"
        )
    plan_path, manifest_path = directory / PLAN, directory / MANIFEST
    if not plan_path.exists():
        raise LedgerIncomplete(f"{plan_path} is missing; refusing to guess the privacy plan the ledger was written for")
    if not manifest_path.exists():
        raise LedgerIncomplete(
            f"{manifest_path} is missing; without it deleted or emptied client files cannot be detected, so the ledger cannot be trusted"
        )
    header = _read_json(plan_path)
    manifest = _read_json(manifest_path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("clients"), dict):
        raise LedgerError(f"{manifest_path}: expected an object with a 'clients' mapping")
    problems: list[str] = []
    if manifest.get("plan_sha256") != _plan_sha256(header):
        problems.append(f"{plan_path}: does not match the plan the manifest was written for (plan.json altered or swapped)")
    entries: dict[int, list[LedgerEntry]] = {}
    pending: dict[int, str] = {}
    listed: dict[int, Mapping[str, Any]] = {}
    for key, rec in manifest["clients"].items():
        try:
            listed[int(key)] = {"file": str(rec["file"]), "count": int(rec["count"]), "head": str(rec["head"])}
        except (KeyError, TypeError, ValueError) as exc:
            raise LedgerError(f"{manifest_path}: malformed record for client {key!r} ({exc})") from exc
    on_disk: dict[int, Path] = {}
    for path in sorted(directory.glob("client-*")):
        m = _CLIENT_FILE.match(path.name)
        if m is None:
            problems.append(f"{path}: unexpected file in the ledger (a renamed client file? the ledger names them client-<id>.json)")
        else:
            on_disk[int(m.group(1))] = path
    for c in sorted(set(listed) | set(on_disk)):
        path = directory / client_file(c)
        rec = listed.get(c)
        if rec is not None and rec["file"] != path.name:
            problems.append(f"{manifest_path}: client {c} is listed with file {rec['file']!r}, expected {path.name!r}")
            continue
        if c not in on_disk:
            assert rec is not None  # c is listed, or it would not be here
            problems.append(f"{path}: missing (deleted or renamed); the manifest records {rec['count']} release(s) of client {c}")
            continue
        rows = _load_client_file(path)
        foreign = sorted({e.client for e in rows} - {c})
        if foreign:
            problems.append(f"{path}: holds entries of client(s) {foreign} (a renamed client file)")
            continue
        rounds = [e.round for e in rows]
        if rounds != sorted(set(rounds)):
            problems.append(f"{path}: entries are not one per round in round order (rounds {rounds})")
            continue
        entries[c] = rows
        count, head = (0, chain_head(c, [])) if rec is None else (rec["count"], rec["head"])
        if len(rows) == count and chain_head(c, rows) == head:
            continue
        if len(rows) == count + 1 and any(chain_head(c, rows[:i] + rows[i + 1 :]) == head for i in range(len(rows))):
            pending[c] = chain_head(c, rows)  # the crash window between the entry and the manifest: keep it
            continue
        if not rows and count:
            problems.append(f"{path}: emptied; it holds no entries, the manifest records {count} release(s) of client {c}")
        elif len(rows) < count:
            problems.append(f"{path}: truncated; it holds {len(rows)} entries, the manifest records {count} for client {c}")
        elif rec is None:
            problems.append(f"{path}: holds {len(rows)} entries the manifest never recorded (client {c} is not in {MANIFEST})")
        else:
            problems.append(
                f"{path}: hash chain mismatch; its {len(rows)} entries do not reproduce the manifest's chain head for client {c} "
                f"({count} entries): an entry was altered, swapped or removed"
            )
    if not isinstance(header, dict):
        problems.append(f"{plan_path}: expected an object")
        header = {}
    return LedgerCheck(directory, header, entries, problems, manifest, pending)


def ledger_commitment(directory: Path) -> dict[str, list[Any]] | None:
    """Each client's ``[count, chain head]`` as the manifest records it now (None without a manifest).

    A run's checkpoint stores it (:meth:`fedrlhf_secure.federation.engine.Federation._save_checkpoint`)
    so that a resume can tell a ledger that was *rolled back* as a whole (an older backup restored,
    or a fresh empty ledger put in place: each is consistent with its own manifest) from the one the
    checkpoint was taken with: see :func:`check_extends`.
    """
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    manifest = _read_json(path)
    return {str(c): [int(rec["count"]), str(rec["head"])] for c, rec in dict(manifest.get("clients", {})).items()}


def check_extends(check: LedgerCheck, commitment: Mapping[str, Any], source: Path) -> list[str]:
    """The problems (each naming its file) where the ledger holds less than ``commitment`` (a checkpoint's
    :func:`ledger_commitment`): fewer entries for a client, or a first ``count`` entries that do not
    reproduce the committed chain head. A ledger only ever grows, so either is a rollback."""
    problems: list[str] = []
    for key, (count, head) in sorted(commitment.items(), key=lambda kv: int(kv[0])):
        c = int(key)
        rows = check.entries.get(c, [])
        path = check.directory / client_file(c)
        if len(rows) < int(count):
            problems.append(
                f"{path}: holds {len(rows)} entries, but {source} was taken when client {c} had {count}: the ledger was rolled "
                "back (an older copy restored, or a new ledger put in place)"
            )
        elif chain_head(c, rows[: int(count)]) != head:
            problems.append(f"{path}: its first {count} entries are not the ones {source} recorded for client {c} (hash chain differs)")
    return problems


# ---------------------------------------------------------------------------------------------
# The ledger, open for writing
# ---------------------------------------------------------------------------------------------


class PrivacyLedger:
    """Per-run, per-client ledger in one directory (see the module docstring for the semantics)."""

    def __init__(self, directory: Path, header: Mapping[str, Any], *, resume: bool) -> None:
        self.directory = Path(directory)
        self.header = {"version": LEDGER_VERSION, **header}
        self._entries: dict[int, dict[int, LedgerEntry]] = {}
        if resume:
            loaded = self._reopen()
        else:
            self._create()
            loaded = {}
        for c, rows in loaded.items():
            self._entries[c] = {e.round: e for e in rows}

    # ------------------------------------------------------------------ opening
    def _create(self) -> None:
        """A fresh ledger: plan and empty manifest built aside and renamed in, so ``ledger/`` is whole or absent."""
        d = self.directory
        if (d / PLAN).exists() or (d / MANIFEST).exists() or (d.exists() and any(d.glob("client-*"))):
            raise LedgerRefused(f"{d} already holds a ledger; a new run never reuses one (use --resume)")
        if d.exists() and any(d.iterdir()):
            raise LedgerRefused(f"{d} exists and is not empty; a new ledger is only created in an empty place")
        d.parent.mkdir(parents=True, exist_ok=True)
        staging = d.with_name(f".{d.name}.new-{os.getpid()}-{os.urandom(4).hex()}")
        staging.mkdir()
        try:
            plan = json.loads(json.dumps(self.header))
            atomic_write_json(staging / PLAN, plan)
            _write_manifest(staging / MANIFEST, {"version": MANIFEST_VERSION, "plan_sha256": _plan_sha256(plan), "clients": {}})
            os.replace(staging, d)  # replaces an empty directory too (POSIX rename)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_dir(d.parent)

    def _reopen(self) -> dict[int, list[LedgerEntry]]:
        """Open an existing ledger for a resumed run: it must be whole (see :func:`check_ledger`) and for the same plan."""
        with self._locked():
            check = check_ledger(self.directory)
            check.raise_if_broken()
            plan_path = self.directory / PLAN
            if check.header != json.loads(json.dumps(self.header)):
                raise LedgerRefused(
                    f"{plan_path}: the ledger was written for {check.header}, but the resumed run asks for {self.header}; "
                    "a resumed run must keep its privacy plan"
                )
            if check.pending:
                logger.warning(
                    "privacy ledger %s: client(s) %s hold one entry written just before a crash and not yet in the manifest; "
                    "it stays counted (the manifest is rolled forward)",
                    self.directory,
                    sorted(check.pending),
                )
                for c in sorted(check.pending):
                    self._write_manifest_record(c, check.entries[c])
        return check.entries

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive lock over the ledger's read-modify-write (worker processes of one run share it)."""
        if not self.directory.is_dir():
            yield  # nothing to lock: check_ledger refuses the missing directory
            return
        fd = os.open(self.directory / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write_manifest_record(self, client: int, rows: list[LedgerEntry]) -> None:
        """Set ``client``'s record in the manifest as it is on disk now (call under :meth:`_locked`)."""
        path = self.directory / MANIFEST
        manifest = _read_json(path)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("clients"), dict):
            raise LedgerError(f"{path}: expected an object with a 'clients' mapping")
        manifest["clients"][str(int(client))] = {"file": client_file(client), "count": len(rows), "head": chain_head(client, rows)}
        _write_manifest(path, manifest)

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
        """Durably record ``entry`` (client file, then manifest); idempotent for an identical release
        (returns the stored entry)."""
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
        ordered = [rows[r] for r in sorted(rows)]
        if not (self.directory / MANIFEST).exists():
            raise LedgerIncomplete(f"{self.directory / MANIFEST} is missing; refusing to record a release into a ledger without it")
        with self._locked():
            self._write_client_file(entry.client, ordered)
            self._write_manifest_record(entry.client, ordered)
        self._entries[entry.client] = rows
        return entry

    def _write_client_file(self, client: int, rows: list[LedgerEntry]) -> None:
        atomic_write_json(self.directory / client_file(client), {"client": client, "entries": [asdict(e) for e in rows]})


def read_ledger(directory: Path) -> tuple[dict[str, Any], dict[int, list[LedgerEntry]]]:
    """Read a ledger without opening it for writing (``fedrlhf ledger``, audits), refusing one that is
    incomplete or altered (:class:`LedgerIncomplete`); :class:`LedgerMissing` where there is none at all."""
    directory = Path(directory)
    if not directory.exists():
        raise LedgerMissing(f"no privacy ledger at {directory} (expected {directory / PLAN})")
    check = check_ledger(directory)
    check.raise_if_broken()
    return check.header, check.entries
