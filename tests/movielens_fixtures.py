"""Small MovieLens directories in the real file formats, written into a test's tmp_path.

* :func:`write_ml100k`: ``ml-100k/`` with ``u.data``, ``u.item`` (latin-1, 24 '|' fields, one title
  with a non-ASCII character), ``u.user``, ``u.genre`` and the official split files ``u1..u5``,
  ``ua``, ``ub`` (``.base``/``.test``), all tab-separated ``user item rating timestamp``.
* :func:`write_latest_small`: ``ml-latest-small/`` with ``ratings.csv`` (half stars) and
  ``movies.csv`` (quoted titles with commas, pipe-separated genres, "(no genres listed)").

Ratings carry signal (each user has a taste vector over genres, each item a quality), so that
training on them measurably beats chance.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from fedrlhf_secure.tasks.movielens.data import ML100K_GENRES

GENRES = ML100K_GENRES  # the package's own list of u.genre names, in file order
LATIN1_TITLE = "Café Society (1995)"


def synthetic_ratings(n_users: int, n_items: int, per_user: int, seed: int, half_stars: bool = False):
    """(user_id, item_id, rating, timestamp) rows, ids from 1, each user rating ``per_user`` distinct items."""
    rng = np.random.default_rng(seed)
    genre_flags = (rng.random((n_items, len(GENRES))) < 0.2).astype(int)
    genre_flags[np.arange(n_items), rng.integers(1, len(GENRES), n_items)] = 1
    taste = rng.normal(0, 1, (n_users, len(GENRES)))
    quality = rng.normal(0, 1, n_items)
    bias = rng.normal(0, 0.5, n_users)
    rows = []
    for u in range(n_users):
        items = rng.choice(n_items, size=min(per_user, n_items), replace=False)
        for i in items:
            score = 3.3 + bias[u] + 0.8 * quality[i] + 0.5 * (genre_flags[i] @ taste[u]) / max(genre_flags[i].sum(), 1)
            score += rng.normal(0, 0.4)
            r = np.clip(np.round(score * 2) / 2, 0.5, 5.0) if half_stars else np.clip(np.round(score), 1, 5)
            rows.append((u + 1, int(i) + 1, float(r) if half_stars else int(r), 874724710 + len(rows)))
    return rows, genre_flags


def write_ml100k(root: Path, *, n_users: int = 12, n_items: int = 40, per_user: int = 20, seed: int = 0) -> Path:
    """Write ``root/ml-100k`` and return it."""
    d = Path(root) / "ml-100k"
    d.mkdir(parents=True, exist_ok=True)
    rows, flags = synthetic_ratings(n_users, n_items, per_user, seed)

    def dump(name: str, subset) -> None:
        (d / name).write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in subset), encoding="latin-1")

    dump("u.data", rows)
    items = []
    for i in range(n_items):
        title = LATIN1_TITLE if i == 0 else f"Movie {i + 1} (199{i % 10})"
        items.append("|".join([str(i + 1), title, "01-Jan-1995", "", f"http://us.imdb.com/M/title-exact?m{i + 1}", *map(str, flags[i])]))
    (d / "u.item").write_bytes(("\n".join(items) + "\n").encode("latin-1"))
    occupations = ["technician", "writer", "student", "other"]
    users = [f"{u + 1}|{20 + u}|{'MF'[u % 2]}|{occupations[u % 4]}|{10000 + u:05d}" for u in range(n_users)]
    (d / "u.user").write_text("\n".join(users) + "\n", encoding="latin-1")
    (d / "u.genre").write_text("".join(f"{g}|{k}\n" for k, g in enumerate(GENRES)) + "\n", encoding="latin-1")
    rng = np.random.default_rng(seed + 1)
    for split in ("u1", "u2", "u3", "u4", "u5", "ua", "ub"):
        test = rng.random(len(rows)) < 0.2
        dump(f"{split}.base", [r for r, t in zip(rows, test, strict=False) if not t])
        dump(f"{split}.test", [r for r, t in zip(rows, test, strict=False) if t])
    return d


def write_latest_small(root: Path, *, n_users: int = 10, n_items: int = 30, per_user: int = 15, seed: int = 0) -> Path:
    """Write ``root/ml-latest-small`` (sparse movieIds, half-star ratings) and return it."""
    d = Path(root) / "ml-latest-small"
    d.mkdir(parents=True, exist_ok=True)
    rows, flags = synthetic_ratings(n_users, n_items, per_user, seed, half_stars=True)
    movie_ids = [10 * (i + 1) + 3 for i in range(n_items)]  # sparse ids, like the real file
    with (d / "movies.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["movieId", "title", "genres"])
        for i in range(n_items):
            names = [g for g, f in zip(GENRES[1:], flags[i][1:], strict=False) if f]
            title = "Good, the Bad and the Ugly, The (1966)" if i == 1 else f"Film {i} (2001)"
            w.writerow([movie_ids[i], title, "|".join(names) if names else "(no genres listed)"])
    with (d / "ratings.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["userId", "movieId", "rating", "timestamp"])
        for u, i, r, t in rows:
            w.writerow([u * 3, movie_ids[i - 1], f"{r:.1f}", t])
    return d
