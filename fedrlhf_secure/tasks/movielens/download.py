"""``fedrlhf data --dest DIR``: download the official GroupLens MovieLens 100K archive and verify it.

The archive is fetched over HTTPS from GroupLens, extracted member by member (paths are checked to
stay inside ``DIR/ml-100k``), and the extracted ``u.data`` is checked against its known SHA-256
before anything is moved into place: the download lands in a temporary directory beside the
destination and is renamed into ``DIR/ml-100k`` only once verified, so a failed or tampered
download leaves nothing behind. Runs never touch the network; they read ``--data-dir`` /
``$FEDRLHF_DATA_DIR``.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from ...configtypes import InputError
from .data import ML100K_DIR

ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
ML100K_U_DATA_SHA256 = "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490"
"""SHA-256 of the extracted ``ml-100k/u.data`` of the official archive (100,000 ratings)."""
REQUIRED_FILES = ("u.data", "u.item", "u.user", "u1.base", "u1.test")


class VerificationError(InputError):
    """The downloaded data is not the official MovieLens 100K."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_ml100k(directory: Path, expected_sha256: str = ML100K_U_DATA_SHA256) -> None:
    """Raise :class:`VerificationError` unless ``directory`` holds the official ML-100K files."""
    missing = [f for f in REQUIRED_FILES if not (directory / f).is_file()]
    if missing:
        raise VerificationError(f"{directory} lacks {', '.join(missing)}: not an ml-100k directory")
    digest = sha256_file(directory / "u.data")
    if digest != expected_sha256:
        raise VerificationError(
            f"{directory / 'u.data'} has SHA-256 {digest}, the official MovieLens 100K u.data has {expected_sha256}"
        )


def extract_ml100k(archive: Path, into: Path) -> Path:
    """Extract the ``ml-100k/`` members of ``archive`` under ``into``; returns ``into/ml-100k``.

    Member names are checked first: absolute paths, ``..`` components and members outside
    ``ml-100k/`` are refused (a zip is untrusted input)."""
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            parts = PurePosixPath(info.filename).parts
            if info.filename.startswith("/") or ".." in parts or not parts or parts[0] != ML100K_DIR:
                raise VerificationError(f"{archive}: unexpected member {info.filename!r} (expected ml-100k/...)")
        for info in zf.infolist():
            if info.is_dir():
                continue
            target = into.joinpath(*PurePosixPath(info.filename).parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst)
    return into / ML100K_DIR


def install_archive(archive: Path, dest: Path, expected_sha256: str = ML100K_U_DATA_SHA256) -> Path:
    """Extract and verify ``archive``, then move it to ``dest/ml-100k`` (replacing nothing)."""
    final = dest / ML100K_DIR
    if final.exists():
        verify_ml100k(final, expected_sha256)
        return final
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".ml-100k-") as tmp:
        extracted = extract_ml100k(archive, Path(tmp))
        verify_ml100k(extracted, expected_sha256)
        extracted.rename(final)
    return final


def download(url: str, to: Path, timeout: float = 60.0) -> None:
    if not url.startswith("https://"):
        raise ValueError(f"refusing a non-HTTPS download URL: {url}")
    with urllib.request.urlopen(url, timeout=timeout) as resp, to.open("wb") as out:  # noqa: S310 (https only)
        shutil.copyfileobj(resp, out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dest", required=True, type=Path, help="directory to put ml-100k/ in (use it as --data-dir)")
    p.add_argument("--url", default=ML100K_URL, help="archive URL (default: the official GroupLens ml-100k.zip)")
    p.add_argument("--archive", type=Path, default=None,
                   help="an already downloaded ml-100k.zip to verify and install instead of downloading")


def run(args: argparse.Namespace) -> int:
    dest: Path = args.dest
    try:
        if args.archive is not None:
            final = install_archive(args.archive, dest)
        else:
            final = dest / ML100K_DIR
            if final.exists():
                verify_ml100k(final)  # already there: check it, download nothing
            else:
                dest.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
                    archive = Path(tmp) / "ml-100k.zip"
                    print(f"downloading {args.url} ...", file=sys.stderr)
                    try:
                        download(args.url, archive)
                    except OSError as exc:
                        print(
                            f"fedrlhf data: error: could not download {args.url} ({exc}). Offline? Download "
                            f"ml-100k.zip elsewhere and run `fedrlhf data --dest {dest} --archive ml-100k.zip`, or "
                            f"unzip it so that {dest / ML100K_DIR}/u.data exists.",
                            file=sys.stderr,
                        )
                        return 2
                    final = install_archive(archive, dest)
    except (VerificationError, zipfile.BadZipFile) as exc:
        print(f"fedrlhf data: error: {exc}", file=sys.stderr)
        return 2
    print(f"MovieLens 100K verified (u.data SHA-256 {ML100K_U_DATA_SHA256[:16]}...) in {final}")
    print(f"use it with: --data-dir {dest}   (or export FEDRLHF_DATA_DIR={dest})")
    return 0
