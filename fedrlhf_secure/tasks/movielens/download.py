"""Download the official GroupLens MovieLens 100K archive and verify it (``fedrlhf data --dest DIR``,
:mod:`fedrlhf_secure.commands.data`).

The archive is fetched over HTTPS from GroupLens, extracted member by member (paths are checked to
stay inside ``DIR/ml-100k``), and the extracted ``u.data`` is checked against its known SHA-256
before anything is moved into place: the download lands in a temporary directory beside the
destination and is renamed into ``DIR/ml-100k`` only once verified, so a failed or tampered
download leaves nothing behind. Runs never touch the network; they read ``--data-dir`` /
``$FEDRLHF_DATA_DIR``.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from ...errors import InputError
from .data import ML100K_DIR

logger = logging.getLogger(__name__)

ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
ML100K_U_DATA_SHA256 = "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490"
"""SHA-256 of the extracted ``ml-100k/u.data`` of the official archive (100,000 ratings)."""
REQUIRED_FILES = ("u.data", "u.item", "u.user", "u1.base", "u1.test")


class VerificationError(InputError):
    """The downloaded data is not the official MovieLens 100K."""


class DownloadFailed(InputError):
    """The archive could not be downloaded (offline?): the message says how to install it by hand."""


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
        raise VerificationError(f"{directory / 'u.data'} has SHA-256 {digest}, the official MovieLens 100K u.data has {expected_sha256}")


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
        raise InputError(f"refusing a non-HTTPS download URL: {url}")
    with urllib.request.urlopen(url, timeout=timeout) as resp, to.open("wb") as out:  # noqa: S310 (https only)
        shutil.copyfileobj(resp, out)


def fetch_ml100k(dest: Path, url: str = ML100K_URL, archive: Path | None = None) -> Path:
    """``dest/ml-100k``, verified: installed from ``archive`` when given, else kept when already
    there (checked, nothing downloaded), else downloaded from ``url`` (HTTPS) and verified.

    Raises :class:`VerificationError` for data that is not the official archive and
    :class:`DownloadFailed` when the download itself fails (its message says how to proceed offline).
    """
    if archive is not None:
        try:
            return install_archive(archive, dest)
        except zipfile.BadZipFile as exc:
            raise VerificationError(f"{archive}: not a zip archive ({exc})") from exc
    final = dest / ML100K_DIR
    if final.exists():
        verify_ml100k(final)  # already there: check it, download nothing
        return final
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        path = Path(tmp) / "ml-100k.zip"
        logger.info("downloading %s ...", url)
        try:
            download(url, path)
        except OSError as exc:
            raise DownloadFailed(
                f"could not download {url} ({exc}). Offline? Download ml-100k.zip elsewhere and run "
                f"`fedrlhf data --dest {dest} --archive ml-100k.zip`, or unzip it so that {final}/u.data exists."
            ) from exc
        try:
            return install_archive(path, dest)
        except zipfile.BadZipFile as exc:
            raise VerificationError(f"{url}: the download is not a zip archive ({exc})") from exc
