"""``fedrlhf data``: archive extraction and SHA-256 verification, offline on a fixture archive."""

from __future__ import annotations

import zipfile

import pytest
from movielens_fixtures import write_ml100k

from fedrlhf_secure.cli import main
from fedrlhf_secure.tasks.movielens.data import load_split
from fedrlhf_secure.tasks.movielens.download import (
    ML100K_U_DATA_SHA256,
    VerificationError,
    install_archive,
    sha256_file,
    verify_ml100k,
)


def make_archive(tmp_path, extra: dict[str, bytes] | None = None):
    src = write_ml100k(tmp_path / "src")
    archive = tmp_path / "ml-100k.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(src.iterdir()):
            zf.write(f, f"ml-100k/{f.name}")
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return archive, sha256_file(src / "u.data")


def test_verified_archive_is_installed_and_loadable(tmp_path):
    archive, digest = make_archive(tmp_path)
    final = install_archive(archive, tmp_path / "data", expected_sha256=digest)
    assert final == tmp_path / "data" / "ml-100k"
    assert len(load_split(tmp_path / "data", "u1").train) > 0
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["ml-100k"]  # no temporary left behind


def test_archive_not_matching_the_official_checksum_is_refused_and_leaves_nothing(tmp_path):
    archive, digest = make_archive(tmp_path)
    assert digest != ML100K_U_DATA_SHA256
    with pytest.raises(VerificationError, match=f"official MovieLens 100K u.data has {ML100K_U_DATA_SHA256}"):
        install_archive(archive, tmp_path / "data")
    assert list((tmp_path / "data").iterdir()) == []


def test_archive_member_escaping_the_directory_is_refused(tmp_path):
    archive, digest = make_archive(tmp_path, {"ml-100k/../../evil.txt": b"x"})
    with pytest.raises(VerificationError, match="unexpected member 'ml-100k/../../evil.txt'"):
        install_archive(archive, tmp_path / "data", expected_sha256=digest)
    assert not (tmp_path / "evil.txt").exists()


def test_incomplete_directory_is_not_verified(tmp_path):
    d = write_ml100k(tmp_path)
    (d / "u1.test").unlink()
    with pytest.raises(VerificationError, match="lacks u1.test"):
        verify_ml100k(d, sha256_file(d / "u.data"))


def test_command_installs_a_given_archive_and_refuses_a_tampered_one(tmp_path, capsys):
    archive, _ = make_archive(tmp_path)
    rc = main(["data", "--dest", str(tmp_path / "data"), "--archive", str(archive)])
    assert rc == 2 and "SHA-256" in capsys.readouterr().err  # the fixture is not the official data


@pytest.mark.integration
def test_real_u_data_matches_the_embedded_checksum(shared_datasets):
    d = shared_datasets / "ml-100k"
    if not d.is_dir():
        pytest.skip(f"{d} not present")
    verify_ml100k(d)
