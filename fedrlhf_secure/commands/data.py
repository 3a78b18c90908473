"""``fedrlhf data --dest DIR``: download the official GroupLens MovieLens 100K archive and verify it.

The download, extraction and checks are :mod:`fedrlhf_secure.tasks.movielens.download`; runs never
touch the network, they read ``--data-dir`` / ``$FEDRLHF_DATA_DIR``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..tasks.movielens.download import ML100K_U_DATA_SHA256, ML100K_URL


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dest", required=True, type=Path, help="directory to put ml-100k/ in (use it as --data-dir)")
    p.add_argument("--url", default=ML100K_URL, help="archive URL (default: the official GroupLens ml-100k.zip)")
    p.add_argument(
        "--archive", type=Path, default=None, help="an already downloaded ml-100k.zip to verify and install instead of downloading"
    )


def run(args: argparse.Namespace) -> int:
    """Exit 0; data that is not the official archive, or a failed download, raises (exit 2)."""
    from ..tasks.movielens.download import fetch_ml100k

    final = fetch_ml100k(args.dest, args.url, args.archive)
    print(f"MovieLens 100K verified (u.data SHA-256 {ML100K_U_DATA_SHA256[:16]}...) in {final}")
    print(f"use it with: --data-dir {args.dest}   (or export FEDRLHF_DATA_DIR={args.dest})")
    return 0
