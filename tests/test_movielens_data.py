"""MovieLens loaders on generated fixtures in the real formats, and their bad-input errors."""

from __future__ import annotations

import numpy as np
import pytest
from movielens_fixtures import LATIN1_TITLE, write_latest_small, write_ml100k

from fedrlhf_secure.tasks.movielens.data import (
    MovieLensFormatError,
    MovieLensMissingError,
    load_split,
    read_catalogue_100k,
    read_latest_small,
    resolve_data_dir,
)
from fedrlhf_secure.tasks.movielens.feedback import labels


def test_ml100k_split_loads_with_latin1_titles_and_genre_flags(tmp_path):
    d = write_ml100k(tmp_path, n_users=12, n_items=40, per_user=20)
    split = load_split(tmp_path, "u1")
    cat = split.catalogue
    assert (cat.num_users, cat.num_items, cat.genres.shape) == (12, 40, (40, 19))
    assert cat.titles[0] == LATIN1_TITLE
    assert cat.format == "ml-100k"
    base = np.loadtxt(d / "u1.base", dtype=np.int64)
    test = np.loadtxt(d / "u1.test", dtype=np.int64)
    assert len(split.train) == len(base) and len(split.test) == len(test)
    # ids map to positions in the catalogue files (ids are 1-based there)
    np.testing.assert_array_equal(cat.user_ids[split.train.user], base[:, 0])
    np.testing.assert_array_equal(cat.item_ids[split.train.item], base[:, 1])
    np.testing.assert_array_equal(split.train.rating, base[:, 2].astype(np.float32))
    flags = np.array([line.split("|")[5:] for line in (d / "u.item").read_text(encoding="latin-1").splitlines()], dtype=np.float32)
    np.testing.assert_array_equal(cat.genres, flags)


def test_data_dir_may_be_the_parent_or_the_dataset_dir_or_the_env_var(tmp_path, monkeypatch):
    d = write_ml100k(tmp_path)
    assert resolve_data_dir(tmp_path) == d
    assert resolve_data_dir(d) == d
    monkeypatch.setenv("FEDRLHF_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(None) == d


def test_ml_latest_small_half_stars_sparse_ids_and_quoted_titles(tmp_path):
    d = write_latest_small(tmp_path, n_users=10, n_items=30, per_user=15)
    cat, ratings = read_latest_small(d)
    assert cat.num_items == 30 and cat.num_users == 10
    assert cat.item_ids[1] == 23 and cat.titles[1] == "Good, the Bad and the Ugly, The (1966)"
    assert set(np.unique(ratings.rating * 2) % 2) == {0.0, 1.0}  # half stars are kept
    assert cat.user_ids.tolist() == [3 * u for u in range(1, 11)]
    split = load_split(tmp_path, "random", holdout_fraction=0.2, seed=3)
    assert len(split.train) + len(split.test) == 150
    assert split.catalogue.format == "ml-latest-small"


def test_label_is_rating_at_least_four_for_half_stars_too():
    np.testing.assert_array_equal(labels(np.array([1, 3, 3.5, 3.99, 4, 4.5, 5])), [0, 0, 0, 0, 1, 1, 1])


def test_random_split_is_seeded_per_user_and_keeps_training_data(tmp_path):
    write_ml100k(tmp_path, n_users=12, per_user=20)
    a = load_split(tmp_path, "random", holdout_fraction=0.25, seed=1)
    b = load_split(tmp_path, "random", holdout_fraction=0.25, seed=1)
    c = load_split(tmp_path, "random", holdout_fraction=0.25, seed=2)
    np.testing.assert_array_equal(a.test.item, b.test.item)
    assert not np.array_equal(a.test.item, c.test.item)
    assert np.bincount(a.test.user, minlength=12).tolist() == [5] * 12  # round(0.25 * 20) per user
    assert len(a.train) == 12 * 15


def test_malformed_rating_line_names_file_line_and_format(tmp_path):
    d = write_ml100k(tmp_path)
    lines = (d / "u1.base").read_text().splitlines()
    lines[6] = "1\t2\tfive\t881250949"
    (d / "u1.base").write_text("\n".join(lines) + "\n")
    with pytest.raises(MovieLensFormatError) as err:
        load_split(tmp_path, "u1")
    msg = str(err.value)
    assert "u1.base" in msg and "line 7" in msg and "tab-separated" in msg and "'five'" in msg
    assert isinstance(err.value, ValueError) and err.value.line == 7


def test_out_of_range_rating_and_unknown_item_are_rejected(tmp_path):
    d = write_ml100k(tmp_path)
    (d / "u1.test").write_text("1\t2\t7\t881250949\n")
    with pytest.raises(MovieLensFormatError, match=r"u1\.test, line 1: rating 7 is outside 1\.\.5"):
        load_split(tmp_path, "u1")
    (d / "u1.test").write_text("1\t2\t3\t881250949\n1\t999\t3\t881250949\n")
    with pytest.raises(MovieLensFormatError, match=r"line 2: item_id 999 is not in u\.item"):
        load_split(tmp_path, "u1")


def test_malformed_item_line_names_file_and_line(tmp_path):
    d = write_ml100k(tmp_path)
    lines = (d / "u.item").read_bytes().decode("latin-1").splitlines()
    lines[2] = "3|Short line|01-Jan-1995"
    (d / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    with pytest.raises(MovieLensFormatError, match=r"u\.item, line 3: 3 fields; expected 24 '\|'-separated fields"):
        read_catalogue_100k(d)


def test_bad_csv_header_names_the_file(tmp_path):
    d = write_latest_small(tmp_path)
    (d / "ratings.csv").write_text("user,movie,stars,ts\n1,13,4.0,1\n")
    with pytest.raises(MovieLensFormatError, match=r"ratings\.csv, line 1: header .*userId,movieId,rating,timestamp"):
        read_latest_small(d)


def test_missing_file_says_where_to_put_what_and_mentions_fedrlhf_data(tmp_path):
    d = write_ml100k(tmp_path)
    (d / "u.item").unlink()
    with pytest.raises(MovieLensMissingError) as err:
        load_split(tmp_path, "u1")
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert "u.item is missing" in msg and "fedrlhf data --dest" in msg and "ml-100k" in msg and "ratings.csv" in msg


def test_missing_directory_and_missing_setting_are_explained(tmp_path, monkeypatch):
    with pytest.raises(MovieLensMissingError, match=r"fedrlhf data --dest .*empty"):
        resolve_data_dir(tmp_path / "empty")
    monkeypatch.delenv("FEDRLHF_DATA_DIR", raising=False)
    with pytest.raises(MovieLensMissingError, match="FEDRLHF_DATA_DIR is not set"):
        resolve_data_dir(None)


def test_official_split_on_latest_small_is_rejected_with_the_alternative(tmp_path):
    write_latest_small(tmp_path)
    with pytest.raises(ValueError, match="use split: random"):
        load_split(tmp_path, "u1")


@pytest.mark.parametrize("split", ["u2", "u5", "ua", "ub"])
def test_every_official_split_reads_its_own_base_and_test_files(tmp_path, split):
    d = write_ml100k(tmp_path)
    loaded = load_split(tmp_path, split)
    assert len(loaded.train) == len((d / f"{split}.base").read_text().splitlines())
    assert len(loaded.test) == len((d / f"{split}.test").read_text().splitlines())
    assert loaded.split == split
