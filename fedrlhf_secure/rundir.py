"""The run directory: the contract users, audits and CI rely on.

A run is written into ``<name>.partial/`` beside its final place and renamed to ``<name>/`` only
when it completes, so a finished-looking directory is always complete. A run that fails before
anything privacy-relevant happened removes its ``.partial`` directory; once a DP release has been
recorded in the ledger the ``.partial`` directory is kept (the budget it spent must never be
forgotten) and ``fedrlhf run --resume`` continues it. A DP run's ledger is created (plan and
manifest) before its first round, so ``--resume`` of a DP run refuses a ``.partial`` directory
whose ``ledger/`` is missing, or whose ledger lost or altered entries
(:func:`fedrlhf_secure.federation.engine.check_resumable_ledger`, :mod:`fedrlhf_secure.privacy.ledger`):
resuming it would count the lost releases as zero spend.

Contents: ``config.yaml`` (resolved) · ``metrics.jsonl`` (one object per round) · ``summary.json`` ·
``model.safetensors`` (released global shared parameters) · ``ledger/`` (plan, manifest, one file per client) · ``plots/*.png`` ·
``checkpoint/`` (resume state; removed when the run completes) · ``audit.json`` (after an audit).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file
from safetensors.numpy import save as save_tensors

from .errors import InputError


class RunDirectoryNotFound(InputError, FileNotFoundError):
    """``--resume`` of a path that holds no interrupted run (or a completed one)."""


PARTIAL_SUFFIX = ".partial"


def mkdir_durable(directory: Path) -> None:
    """``mkdir -p`` whose new directories survive a power loss: each one created is fsync'd into its parent."""
    directory = Path(directory)
    missing: list[Path] = []
    d = directory
    while not d.exists():
        missing.append(d)
        if d.parent == d:
            break
        d = d.parent
    directory.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):
        fsync_dir(created.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a crash leaves either the old or the new file, never half: write
    aside, fsync the file, rename over, fsync the directory (the rename itself must be durable)."""
    mkdir_durable(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """fsync a directory, so a rename or a new entry in it survives a power loss (not only the file's
    bytes). File systems that cannot fsync a directory (EINVAL) are skipped silently."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def strict_json(obj: Any, **kw: Any) -> str:
    """``obj`` as strict JSON (RFC 8259): a missing or non-finite number is ``null``, never ``NaN``.

    Python's json writes ``NaN``/``Infinity`` by default, which JavaScript's ``JSON.parse`` and strict
    parsers reject; a client with no held-out ratings has no accuracy, and ``null`` says so.
    """
    return json.dumps(_finite(obj), default=_json_default, allow_nan=False, **kw)


def _finite(obj: Any) -> Any:
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _finite(obj.tolist())
    return obj


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (strict_json(obj, indent=2) + "\n").encode())


def atomic_save_tensors(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    atomic_write_bytes(path, save_tensors({k: np.ascontiguousarray(v) for k, v in tensors.items()}))


def load_tensors(path: Path) -> dict[str, np.ndarray]:
    return load_file(str(path))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class RunDirectory:
    """A run being written (``<final>.partial``) and its final place."""

    def __init__(self, final: Path) -> None:
        self.final = Path(final)
        self.path = self.final.with_name(self.final.name + PARTIAL_SUFFIX)

    @classmethod
    def create(cls, out: Path | None, name: str) -> RunDirectory:
        """A fresh run directory under ``out`` (default ``./runs``) named ``name-YYYYmmdd-HHMMSS``."""
        parent = Path(out) if out else Path("runs")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        final = parent / f"{name}-{stamp}"
        n = 1
        while final.exists() or final.with_name(final.name + PARTIAL_SUFFIX).exists():
            n += 1
            final = parent / f"{name}-{stamp}-{n}"
        rd = cls(final)
        parent.mkdir(parents=True, exist_ok=True)
        rd.path.mkdir()
        fsync_dir(parent)
        return rd

    @classmethod
    def for_resume(cls, given: Path) -> RunDirectory:
        given = Path(given)
        if given.name.endswith(PARTIAL_SUFFIX):
            rd = cls(given.with_name(given.name[: -len(PARTIAL_SUFFIX)]))
        else:
            rd = cls(given)
        if not rd.path.is_dir():
            if (rd.final / "summary.json").is_file():
                raise RunDirectoryNotFound(f"{rd.final} is a completed run; nothing to resume")
            if rd.final.is_dir():
                raise RunDirectoryNotFound(f"{rd.final} is not a run directory (no summary.json, no {rd.path.name}); nothing to resume")
            raise RunDirectoryNotFound(f"no interrupted run at {given} (looked for {rd.path})")
        return rd

    def file(self, *parts: str) -> Path:
        p = self.path.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def append_jsonl(self, name: str, obj: Mapping[str, Any]) -> None:
        with open(self.file(name), "a", encoding="utf-8") as fh:
            fh.write(strict_json(obj) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_jsonl(self, name: str) -> list[dict[str, Any]]:
        p = self.path / name
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]

    def rewrite_jsonl(self, name: str, rows: list[Mapping[str, Any]]) -> None:
        atomic_write_bytes(self.file(name), "".join(strict_json(r) + "\n" for r in rows).encode())

    def finalize(self) -> Path:
        shutil.rmtree(self.path / "checkpoint", ignore_errors=True)
        os.replace(self.path, self.final)
        fsync_dir(self.final.parent)
        return self.final

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def point_latest(path: Path) -> None:
    """Make ``<runs>/latest`` name ``path``: every command that makes a run directory calls this, so
    ``runs/latest`` is always the last run of any command (a failure to link is not an error)."""
    latest = Path(path).parent / "latest"
    try:
        if latest.is_symlink() or latest.exists():
            latest.unlink()
        os.symlink(Path(path).name, latest)
    except OSError:
        pass
