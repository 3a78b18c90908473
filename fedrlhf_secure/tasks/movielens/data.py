"""MovieLens loaders: ML-100K (``u.data``/``u.item``/``u.user`` and the official splits) and ml-latest-small.

Everything is parsed line by line so that a bad line is reported with its file, its line number
and the format that was expected (:class:`MovieLensFormatError`); a missing file says where the
files must go and how to get them (:class:`MovieLensMissingError`). Ids are remapped to
contiguous indices (``user_index``, ``item_index``) in the order of the catalogue files, so that the
item-embedding rows are fixed by *public* metadata (the item list), never by who rated what.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ...errors import InputError

DATA_DIR_ENV = "FEDRLHF_DATA_DIR"
ML100K_DIR = "ml-100k"
LATEST_SMALL_DIR = "ml-latest-small"
OFFICIAL_SPLITS = ("u1", "u2", "u3", "u4", "u5", "ua", "ub")

ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)

_RATINGS_FORMAT = "4 tab-separated integers: user_id<TAB>item_id<TAB>rating (1-5)<TAB>unix_timestamp"
_ITEM_FORMAT = (
    "24 '|'-separated fields (latin-1): item_id|title|release_date|video_release_date|imdb_url|then 19 genre flags (0/1) in u.genre order"
)
_USER_FORMAT = "5 '|'-separated fields: user_id|age|gender|occupation|zip_code"
_CSV_RATINGS_FORMAT = "CSV with header userId,movieId,rating,timestamp; rating in 0.5..5 by half stars"
_CSV_MOVIES_FORMAT = "CSV with header movieId,title,genres; genres '|'-separated"


class MovieLensFormatError(InputError):
    """A malformed MovieLens file: names the file, the line and the expected format."""

    def __init__(self, path: Path, line: int | None, problem: str, expected: str) -> None:
        where = f"{path}, line {line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}; expected {expected}")
        self.path = path
        self.line = line


class MovieLensMissingError(InputError, FileNotFoundError):
    """MovieLens files are absent: the message says exactly where to put which files."""


def missing_data_message(looked_in: list[Path], detail: str = "") -> str:
    places = ", ".join(str(p) for p in looked_in) or "(no directory given)"
    first = looked_in[0] if looked_in else Path("DATA_DIR")
    return (
        f"MovieLens data not found{': ' + detail if detail else ''} (looked in {places}). "
        f"Either run `fedrlhf data --dest {first}` (downloads the official GroupLens ml-100k.zip and verifies "
        f"its SHA-256), or put the ML-100K files u.data, u.item, u.user and the split files u1.base..u5.test, "
        f"ua.base/ua.test, ub.base/ub.test in {first / ML100K_DIR}/ (unzip "
        f"https://files.grouplens.org/datasets/movielens/ml-100k.zip in {first}), or put the ml-latest-small "
        f"files ratings.csv and movies.csv in {first / LATEST_SMALL_DIR}/. Then pass --data-dir {first} "
        f"or set {DATA_DIR_ENV}={first}."
    )


def resolve_data_dir(data_dir: Path | str | None) -> Path:
    """The directory holding the MovieLens files.

    ``data_dir`` (or ``$FEDRLHF_DATA_DIR`` when None) may be the ``ml-100k``/``ml-latest-small``
    directory itself or a directory containing one of them (ml-100k preferred).
    """
    if data_dir is None:
        env = os.environ.get(DATA_DIR_ENV)
        if not env:
            raise MovieLensMissingError(missing_data_message([], f"no --data-dir given and ${DATA_DIR_ENV} is not set"))
        data_dir = env
    base = Path(data_dir)
    for candidate in (base, base / ML100K_DIR, base / LATEST_SMALL_DIR):
        if dataset_format(candidate) is not None:
            return candidate
    raise MovieLensMissingError(missing_data_message([base]))


def dataset_format(directory: Path) -> str | None:
    """``"ml-100k"``, ``"ml-latest-small"`` or None, from the files present."""
    if not directory.is_dir():
        return None
    if (directory / "u.item").is_file() or (directory / "u.data").is_file():
        return "ml-100k"
    if (directory / "ratings.csv").is_file() or (directory / "movies.csv").is_file():
        return "ml-latest-small"
    return None


@dataclass(frozen=True)
class Catalogue:
    """Public metadata: the users and the items (with genre flags), in file order."""

    user_ids: np.ndarray  # (U,) int64 raw ids; user_index = position
    item_ids: np.ndarray  # (I,) int64 raw ids; item_index = position
    titles: tuple[str, ...]
    genres: np.ndarray  # (I, G) float32 0/1
    genre_names: tuple[str, ...]
    format: str

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)


@dataclass(frozen=True)
class Ratings:
    """Rating records as contiguous indices (see :class:`Catalogue`), one row per record."""

    user: np.ndarray  # (N,) int64 user_index
    item: np.ndarray  # (N,) int64 item_index
    rating: np.ndarray  # (N,) float32 stars (half stars allowed)

    def __len__(self) -> int:
        return len(self.user)

    def subset(self, mask_or_index: np.ndarray) -> Ratings:
        return Ratings(self.user[mask_or_index], self.item[mask_or_index], self.rating[mask_or_index])


@dataclass(frozen=True)
class MovieLensSplit:
    catalogue: Catalogue
    train: Ratings
    test: Ratings
    source: Path
    split: str


def _require(path: Path) -> Path:
    if not path.is_file():
        raise MovieLensMissingError(missing_data_message([path.parent.parent], f"{path} is missing"))
    return path


def _read_lines(path: Path, encoding: str) -> list[str]:
    try:
        return path.read_text(encoding=encoding).splitlines()
    except UnicodeDecodeError as exc:
        raise MovieLensFormatError(
            path, None, f"not decodable as {encoding} ({exc.reason} at byte {exc.start})", f"a {encoding} text file"
        ) from exc


def _int(text: str, path: Path, line: int, field: str, expected: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise MovieLensFormatError(path, line, f"{field} {text!r} is not an integer", expected) from None


def read_catalogue_100k(directory: Path) -> Catalogue:
    item_path = _require(directory / "u.item")
    user_path = _require(directory / "u.user")
    item_ids, titles, flags = [], [], []
    for n, line in enumerate(_read_lines(item_path, "latin-1"), start=1):
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) != 5 + len(ML100K_GENRES):
            raise MovieLensFormatError(item_path, n, f"{len(parts)} fields", _ITEM_FORMAT)
        item_ids.append(_int(parts[0], item_path, n, "item_id", _ITEM_FORMAT))
        titles.append(parts[1])
        row = parts[5:]
        if any(f not in ("0", "1") for f in row):
            raise MovieLensFormatError(item_path, n, f"genre flags {row!r} are not all 0/1", _ITEM_FORMAT)
        flags.append([f == "1" for f in row])
    user_ids = []
    for n, line in enumerate(_read_lines(user_path, "latin-1"), start=1):
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) != 5:
            raise MovieLensFormatError(user_path, n, f"{len(parts)} fields", _USER_FORMAT)
        user_ids.append(_int(parts[0], user_path, n, "user_id", _USER_FORMAT))
    _check_unique(item_ids, item_path, "item_id")
    _check_unique(user_ids, user_path, "user_id")
    return Catalogue(
        user_ids=np.asarray(user_ids, dtype=np.int64),
        item_ids=np.asarray(item_ids, dtype=np.int64),
        titles=tuple(titles),
        genres=np.asarray(flags, dtype=np.float32).reshape(len(item_ids), len(ML100K_GENRES)),
        genre_names=ML100K_GENRES,
        format="ml-100k",
    )


def _check_unique(ids: list[int], path: Path, field: str) -> None:
    seen: set[int] = set()
    for n, i in enumerate(ids, start=1):
        if i in seen:
            raise MovieLensFormatError(path, None, f"duplicate {field} {i} (entry {n})", f"unique {field}s")
        seen.add(i)


def read_ratings_100k(path: Path, catalogue: Catalogue) -> Ratings:
    """A ``u.data``-format file (``u.data``, ``uN.base``, ``uN.test``...)."""
    _require(path)
    user_pos = {int(u): i for i, u in enumerate(catalogue.user_ids)}
    item_pos = {int(m): i for i, m in enumerate(catalogue.item_ids)}
    users, items, ratings = [], [], []
    for n, line in enumerate(_read_lines(path, "latin-1"), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 4:
            raise MovieLensFormatError(path, n, f"{len(parts)} tab-separated fields", _RATINGS_FORMAT)
        u = _int(parts[0], path, n, "user_id", _RATINGS_FORMAT)
        m = _int(parts[1], path, n, "item_id", _RATINGS_FORMAT)
        r = _int(parts[2], path, n, "rating", _RATINGS_FORMAT)
        _int(parts[3], path, n, "timestamp", _RATINGS_FORMAT)
        if not 1 <= r <= 5:
            raise MovieLensFormatError(path, n, f"rating {r} is outside 1..5", _RATINGS_FORMAT)
        if u not in user_pos:
            raise MovieLensFormatError(path, n, f"user_id {u} is not in u.user", _RATINGS_FORMAT)
        if m not in item_pos:
            raise MovieLensFormatError(path, n, f"item_id {m} is not in u.item", _RATINGS_FORMAT)
        users.append(user_pos[u])
        items.append(item_pos[m])
        ratings.append(r)
    return Ratings(np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64), np.asarray(ratings, dtype=np.float32))


def _csv_rows(path: Path, header: list[str], expected: str):
    _require(path)
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            first = next(reader, None)
            if first != header:
                raise MovieLensFormatError(path, 1, f"header {first!r}", expected)
            for row in reader:
                if row:
                    yield reader.line_num, row
    except UnicodeDecodeError as exc:
        raise MovieLensFormatError(path, None, f"not valid UTF-8 ({exc.reason})", expected) from exc


def read_latest_small(directory: Path) -> tuple[Catalogue, Ratings]:
    """``movies.csv`` + ``ratings.csv`` (ml-latest-small). Users are those appearing in ratings.csv."""
    movies_path = directory / "movies.csv"
    ratings_path = directory / "ratings.csv"
    item_ids, titles, genre_lists = [], [], []
    for n, row in _csv_rows(movies_path, ["movieId", "title", "genres"], _CSV_MOVIES_FORMAT):
        if len(row) != 3:
            raise MovieLensFormatError(movies_path, n, f"{len(row)} fields", _CSV_MOVIES_FORMAT)
        item_ids.append(_int(row[0], movies_path, n, "movieId", _CSV_MOVIES_FORMAT))
        titles.append(row[1])
        genre_lists.append([] if row[2] == "(no genres listed)" else row[2].split("|"))
    _check_unique(item_ids, movies_path, "movieId")
    genre_names = tuple(sorted({g for gs in genre_lists for g in gs}))
    gpos = {g: i for i, g in enumerate(genre_names)}
    genres = np.zeros((len(item_ids), len(genre_names)), dtype=np.float32)
    for i, gs in enumerate(genre_lists):
        for g in gs:
            genres[i, gpos[g]] = 1.0
    item_pos = {m: i for i, m in enumerate(item_ids)}
    raw_users, items, ratings = [], [], []
    for n, row in _csv_rows(ratings_path, ["userId", "movieId", "rating", "timestamp"], _CSV_RATINGS_FORMAT):
        if len(row) != 4:
            raise MovieLensFormatError(ratings_path, n, f"{len(row)} fields", _CSV_RATINGS_FORMAT)
        u = _int(row[0], ratings_path, n, "userId", _CSV_RATINGS_FORMAT)
        m = _int(row[1], ratings_path, n, "movieId", _CSV_RATINGS_FORMAT)
        try:
            r = float(row[2])
        except ValueError:
            raise MovieLensFormatError(ratings_path, n, f"rating {row[2]!r} is not a number", _CSV_RATINGS_FORMAT) from None
        if not (0.5 <= r <= 5.0 and (2 * r).is_integer()):
            raise MovieLensFormatError(ratings_path, n, f"rating {row[2]} is not a half star in 0.5..5", _CSV_RATINGS_FORMAT)
        _int(row[3], ratings_path, n, "timestamp", _CSV_RATINGS_FORMAT)
        if m not in item_pos:
            raise MovieLensFormatError(ratings_path, n, f"movieId {m} is not in movies.csv", _CSV_RATINGS_FORMAT)
        raw_users.append(u)
        items.append(item_pos[m])
        ratings.append(r)
    user_ids = np.unique(np.asarray(raw_users, dtype=np.int64))
    users = np.searchsorted(user_ids, np.asarray(raw_users, dtype=np.int64))
    catalogue = Catalogue(
        user_ids=user_ids,
        item_ids=np.asarray(item_ids, dtype=np.int64),
        titles=tuple(titles),
        genres=genres,
        genre_names=genre_names,
        format="ml-latest-small",
    )
    return catalogue, Ratings(users.astype(np.int64), np.asarray(items, dtype=np.int64), np.asarray(ratings, dtype=np.float32))


def random_split(ratings: Ratings, holdout_fraction: float, seed: int, stream: int = 0x5EED) -> tuple[Ratings, Ratings]:
    """Seeded per-user split: each user keeps ``round(holdout_fraction * n_u)`` records held out,
    at least one record in training (users with a single rating keep it for training). ``stream``
    keeps the validation split's draw (:data:`VALIDATION_STREAM`) apart from the ``random`` split's."""
    rng = np.random.default_rng([seed, stream])
    test_mask = np.zeros(len(ratings), dtype=bool)
    order = np.argsort(ratings.user, kind="stable")
    bounds = np.flatnonzero(np.diff(ratings.user[order])) + 1
    for group in np.split(order, bounds):
        k = min(int(round(holdout_fraction * len(group))), len(group) - 1)
        if k > 0:
            test_mask[rng.choice(group, size=k, replace=False)] = True
    return ratings.subset(~test_mask), ratings.subset(test_mask)


VALIDATION_STREAM = 0x7A11D
"""The generator stream of the validation split (``task.validation``)."""


def load_split(
    data_dir: Path | str | None, split: str, holdout_fraction: float = 0.2, seed: int = 0, validation: bool = False
) -> MovieLensSplit:
    """Catalogue + train/held-out ratings for ``split`` (``u1``..``u5``, ``ua``, ``ub`` or ``random``).

    ``validation``: for tuning without looking at the held-out set. The split's *training* ratings
    are split again per user (:func:`random_split`, ``holdout_fraction`` held out, seeded by ``seed``):
    the federation trains on the rest and is evaluated on that validation part; the split's own
    held-out ratings are dropped, so nothing a tuning run reports depends on them."""
    split_data = _load_split(data_dir, split, holdout_fraction, seed, read_test=not validation)
    if not validation:
        return split_data
    train, val = random_split(split_data.train, holdout_fraction, seed, VALIDATION_STREAM)
    return MovieLensSplit(split_data.catalogue, train, val, split_data.source, f"{split}-validation")


def _load_split(data_dir: Path | str | None, split: str, holdout_fraction: float, seed: int, read_test: bool = True) -> MovieLensSplit:
    directory = resolve_data_dir(data_dir)
    fmt = dataset_format(directory)
    if fmt == "ml-100k":
        catalogue = read_catalogue_100k(directory)
        if split == "random":
            train, test = random_split(read_ratings_100k(directory / "u.data", catalogue), holdout_fraction, seed)
        elif split in OFFICIAL_SPLITS:
            train = read_ratings_100k(directory / f"{split}.base", catalogue)
            test = read_ratings_100k(directory / f"{split}.test", catalogue) if read_test else train.subset(np.zeros(0, dtype=np.int64))
        else:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(OFFICIAL_SPLITS)} or 'random'")
    else:
        if split != "random":
            raise ValueError(
                f"split {split!r} is an ML-100K split; {directory} holds ml-latest-small, which has no official "
                f"splits: use split: random (with holdout_fraction)"
            )
        catalogue, ratings = read_latest_small(directory)
        train, test = random_split(ratings, holdout_fraction, seed)
    return MovieLensSplit(catalogue, train, test, directory, split)


def resample_users(split: MovieLensSplit, num_users: int, seed: int) -> MovieLensSplit:
    """``num_users`` synthetic users made from the real ones, for scale benchmarks (``fedrlhf bench scale``).

    Procedure (documented in docs/movielens.md): synthetic user ``s`` is a bootstrap draw of one
    real user (uniformly, with replacement, among users with at least one training rating) and
    takes that user's training and held-out ratings, with every item replaced through a random
    permutation of the catalogue *within genre signature* (items whose genre flags are identical
    are exchanged; one permutation per synthetic user, so a synthetic user still rates each item
    at most once). A synthetic user thus keeps a real user's number of ratings, star distribution,
    train/held-out sizes and genre profile, while item popularity is spread over each genre class
    and no two synthetic users copy the same items. Deterministic in ``seed``.
    """
    if num_users < 1:
        raise ValueError(f"num_users must be >= 1, got {num_users}")
    cat = split.catalogue
    rng = np.random.default_rng([seed, 0x5CA1E])
    real = np.unique(split.train.user)
    source = rng.choice(real, size=num_users, replace=True)
    # genre signature class of each item, and the items of the catalogue sorted by class
    _, klass = np.unique(cat.genres.astype(np.uint8), axis=0, return_inverse=True)
    klass = klass.reshape(-1).astype(np.float64)
    by_class = np.argsort(klass, kind="stable")
    slot = np.empty(cat.num_items, dtype=np.int64)
    slot[by_class] = np.arange(cat.num_items)  # item -> its position in the class-sorted order

    def records(ratings: Ratings) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(ratings.user, kind="stable")
        starts = np.searchsorted(ratings.user[order], np.arange(cat.num_users + 1))
        return order, starts

    train_order, train_starts = records(split.train)
    test_order, test_starts = records(split.test)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("tu", "ti", "tr", "hu", "hi", "hr")}
    chunk = 512
    for c0 in range(0, num_users, chunk):
        users = np.arange(c0, min(c0 + chunk, num_users))
        # one within-class permutation per synthetic user: items sorted by (class, random key)
        perm = np.argsort(klass[None, :] + rng.random((len(users), cat.num_items)), axis=1)  # row s: class-sorted, shuffled in class
        for s_local, s in enumerate(users):
            u = source[s]
            mapping = perm[s_local][slot]  # item i -> the item at i's class-sorted position in this user's shuffle
            for ratings, order, starts, (ku, ki, kr) in (
                (split.train, train_order, train_starts, ("tu", "ti", "tr")),
                (split.test, test_order, test_starts, ("hu", "hi", "hr")),
            ):
                rows = order[starts[u] : starts[u + 1]]
                parts[ku].append(np.full(len(rows), s, dtype=np.int64))
                parts[ki].append(mapping[ratings.item[rows]])
                parts[kr].append(ratings.rating[rows])

    def cat_parts(key: str, dtype: type) -> np.ndarray:
        return np.concatenate(parts[key]).astype(dtype) if parts[key] else np.zeros(0, dtype=dtype)

    train = Ratings(cat_parts("tu", np.int64), cat_parts("ti", np.int64), cat_parts("tr", np.float32))
    test = Ratings(cat_parts("hu", np.int64), cat_parts("hi", np.int64), cat_parts("hr", np.float32))
    catalogue = replace(cat, user_ids=np.arange(1, num_users + 1, dtype=np.int64))
    return MovieLensSplit(catalogue, train, test, split.source, f"{split.split}-resampled-{num_users}")
