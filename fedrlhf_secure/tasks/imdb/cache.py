"""Where the one-off artefacts (trained tokenizer, pretrained policy) live between runs.

Each artefact sits in a folder named by a hash of everything it was built from (its config, the
data it read, the library versions that shape its bytes), so a changed input builds a new one and
an unchanged one is reused. Folders are written aside and renamed into place, so a crash leaves no
half-written artefact behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    return Path(os.environ.get("FEDRLHF_CACHE_DIR") or Path.home() / ".cache" / "fedrlhf")


def fingerprint(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def texts_fingerprint(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def cached_dir(kind: str, key: str, build: Callable[[Path], None]) -> Path:
    """``cache_root()/kind/key``, calling ``build(tmp_dir)`` first when it does not exist yet."""
    final = cache_root() / kind / key
    if (final / "DONE").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=final.parent))
    try:
        build(tmp)
        (tmp / "DONE").write_text("ok\n")
        if final.exists():  # an unfinished leftover, or a concurrent builder won the race
            if (final / "DONE").is_file():
                shutil.rmtree(tmp)
                return final
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
