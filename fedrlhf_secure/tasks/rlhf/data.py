"""Preference data in TRL's standard formats, split into who may see what.

TRL's formats (https://huggingface.co/docs/trl/dataset_formats), standard (plain-text) variant:

* prompt-only: ``prompt``;
* preference: ``prompt``, ``chosen``, ``rejected``;
* implicit preference: ``chosen``, ``rejected`` (the prompt is the longest common prefix, which
  :func:`explicit_prompt` splits off so every row becomes a preference row).

Rows are read with HF ``datasets`` from a local file (``.jsonl``/``.json``/``.parquet``/``.csv``), a
folder of such files, or a hub name, and dealt to clients (:func:`partition`): one client per value
of a user/annotator column, a Dirichlet split (non-IID sizes), or IID. A fixed fraction of each
client's rows is held out for evaluation.

The IMDb preset (:func:`imdb_split`) builds the same structures from the labelled reviews: prompts
are review openings of the public pool (no client's review), each client's private feedback is its
shard of labelled reviews, and its offline pairs are built from them as in the IMDb experiment of
the DPO paper (Rafailov et al. 2023, §6.1): chosen = a positive review's continuation, rejected = a
negative review's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import InputError
from ..imdb.data import Reviews, load_reviews
from .config import RLHFConfig

_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class Pairs:
    """Preference rows (``rejected`` empty strings for prompt-only data); ``ids`` are row ids in the loaded data."""

    prompt: list[str]
    chosen: list[str]
    rejected: list[str]
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.prompt)

    def take(self, idx) -> Pairs:
        idx = np.asarray(idx, dtype=np.int64)
        return Pairs([self.prompt[i] for i in idx], [self.chosen[i] for i in idx], [self.rejected[i] for i in idx], self.ids[idx])

    @property
    def has_pairs(self) -> bool:
        return any(self.chosen)

    @staticmethod
    def concat(parts: list[Pairs]) -> Pairs:
        return Pairs(
            [p for x in parts for p in x.prompt],
            [p for x in parts for p in x.chosen],
            [p for x in parts for p in x.rejected],
            np.concatenate([x.ids for x in parts]).astype(np.int64) if parts else np.zeros(0, np.int64),
        )


@dataclass
class ClientData:
    """What client k holds: its prompts, its own preference pairs, and (IMDb) its labelled reviews."""

    prompts: list[str]
    pairs: Pairs
    reviews: Reviews | None = None


@dataclass
class RLHFSplit:
    clients: list[ClientData]
    eval_prompts: list[list[str]]
    """Held-out prompts per client (IMDb: openings of test reviews)."""
    eval_pairs: list[Pairs]
    judge_train: Reviews | None = None
    """IMDb: test reviews the independent judge trains on (no client's reward sees them)."""
    judge_check: Reviews | None = None
    universe: Pairs | None = None
    """Every row of the loaded data (BYOD) or every training review (IMDb, as pairs with empty text): the audits' record universe."""
    extras: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------- generic TRL data


def _data_files(source: str, data_dir: Path | None) -> tuple[str, dict[str, list[str]]] | None:
    path = Path(os.path.expanduser(source))
    if not path.is_absolute() and not path.exists() and data_dir is not None and (Path(data_dir) / source).exists():
        path = Path(data_dir) / source
    if path.is_file():
        loader = _LOADERS.get(path.suffix.lower())
        if loader is None:
            raise InputError(f"task.data: {path}: unsupported file type {path.suffix!r}; expected one of {', '.join(_LOADERS)}")
        return loader, {"train": [str(path)]}
    if path.is_dir():
        for suffix, loader in _LOADERS.items():
            files = sorted(str(p) for p in path.rglob(f"*{suffix}"))
            if files:
                return loader, {"train": files}
        raise InputError(f"task.data: folder {path} holds no {', '.join(_LOADERS)} file")
    if source.startswith((".", "/", "~")) or source.endswith(tuple(_LOADERS)):
        raise InputError(f"task.data: {source} does not exist")
    return None


def load_rows(source: str, data_dir: Path | None):
    """A ``datasets.Dataset`` from a local file/folder, or a hub name (its ``train`` split)."""
    import datasets

    local = _data_files(source, data_dir)
    if local is not None:
        loader, files = local
        return datasets.load_dataset(loader, data_files=files, split="train")
    return datasets.load_dataset(source, split="train")


def explicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Implicit preference → (prompt, chosen, rejected): the prompt is the longest common prefix, cut
    back to a word boundary so both completions start with a space (what a tokenizer sees at inference)."""
    n = len(os.path.commonprefix([chosen, rejected]))
    while n > 0 and not chosen[n - 1].isspace() and n < len(chosen) and not chosen[n].isspace():
        n -= 1
    while n > 0 and chosen[n - 1].isspace():
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def _text(value, column: str) -> str:
    if isinstance(value, str):
        return value
    raise InputError(
        f"task.data: column {column!r} must hold plain text (TRL's standard format); "
        "conversational rows (lists of messages) are not supported"
    )


def rows_to_pairs(ds, fmt: str) -> Pairs:
    cols = set(ds.column_names)
    if fmt == "auto":
        fmt = "preference" if {"prompt", "chosen", "rejected"} <= cols else "implicit" if {"chosen", "rejected"} <= cols else "prompt"
    need = {"preference": {"prompt", "chosen", "rejected"}, "implicit": {"chosen", "rejected"}, "prompt": {"prompt"}}[fmt]
    if not need <= cols:
        raise InputError(f"task.data: format {fmt} needs columns {sorted(need)}; the data has {sorted(cols)}")
    n = len(ds)
    if fmt == "prompt":
        return Pairs([_text(p, "prompt") for p in ds["prompt"]], [""] * n, [""] * n, np.arange(n, dtype=np.int64))
    chosen = [_text(c, "chosen") for c in ds["chosen"]]
    rejected = [_text(r, "rejected") for r in ds["rejected"]]
    if fmt == "implicit":
        rows = [explicit_prompt(c, r) for c, r in zip(chosen, rejected, strict=True)]
        return Pairs([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], np.arange(n, dtype=np.int64))
    return Pairs([_text(p, "prompt") for p in ds["prompt"]], chosen, rejected, np.arange(n, dtype=np.int64))


def partition(n: int, cfg: RLHFConfig, users: list | None, seed: int) -> tuple[list[np.ndarray], list[str]]:
    """Row indices per client, and each client's name (the annotator, or ``client-k``)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x9A27]))
    if cfg.partition == "user":
        if users is None:
            raise InputError(f"task.partition: user needs the column {cfg.user_column!r} in the data")
        keys = sorted({str(u) for u in users})
        if len(keys) < 1:
            raise InputError("task.data holds no rows")
        as_str = np.asarray([str(u) for u in users])
        return [np.flatnonzero(as_str == k) for k in keys], keys
    k = cfg.clients
    if cfg.partition == "iid":
        parts = np.array_split(rng.permutation(n), k)
        return [np.sort(p) for p in parts], [f"client-{i}" for i in range(k)]
    # Dirichlet (Hsu et al. 2019): per group (user value, or all rows as one group), client shares ~ Dir(α).
    groups = (
        [np.arange(n)]
        if users is None
        else [np.flatnonzero(np.asarray([str(u) for u in users]) == g) for g in sorted({str(u) for u in users})]
    )
    out: list[list[int]] = [[] for _ in range(k)]
    for g in groups:
        g = rng.permutation(g)
        shares = rng.dirichlet(np.full(k, cfg.dirichlet_alpha))
        cuts = (np.cumsum(shares)[:-1] * len(g)).astype(int)
        for c, part in enumerate(np.split(g, cuts)):
            out[c].extend(part.tolist())
    return [np.sort(np.asarray(o, dtype=np.int64)) for o in out], [f"client-{i}" for i in range(k)]


def byod_split(cfg: RLHFConfig, data_dir: Path | None, seed: int) -> tuple[RLHFSplit, list[str]]:
    ds = load_rows(cfg.data, data_dir)
    pairs = rows_to_pairs(ds, cfg.format)
    users = list(ds[cfg.user_column]) if cfg.user_column and cfg.user_column in ds.column_names else None
    if cfg.user_column and users is None:
        raise InputError(f"task.user_column: {cfg.user_column!r} is not a column of {cfg.data} (columns: {ds.column_names})")
    parts, names = partition(len(pairs), cfg, users, seed)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xE7A1]))
    clients, eval_prompts, eval_pairs = [], [], []
    for name, idx in zip(names, parts, strict=True):
        if len(idx) < 2:
            raise InputError(f"task.data: client {name} holds {len(idx)} rows; each client needs at least 2 (one to train, one held out)")
        idx = rng.permutation(idx)
        n_eval = max(1, int(round(cfg.eval_fraction * len(idx))))
        held, own = np.sort(idx[:n_eval]), np.sort(idx[n_eval:])
        mine = pairs.take(own)
        clients.append(ClientData(list(mine.prompt), mine))
        eval_prompts.append([pairs.prompt[i] for i in held])
        eval_pairs.append(pairs.take(held))
    return RLHFSplit(clients, eval_prompts, eval_pairs, universe=pairs), names


# ---------------------------------------------------------------------------- the IMDb preset


def token_prefix(texts: list[str], tokenizer, n_tokens: int) -> list[tuple[str, str]]:
    """(the first ``n_tokens`` tokens, the rest) of each text, cut at a token that starts a word.

    The prompt must end on a token boundary that the tokenizer also produces at inference, so the
    completion starts with a space-prefixed token (otherwise TRL warns that training and inference
    contexts differ). Texts too short for a prompt and a continuation are skipped (empty pair)."""
    out = []
    for t in texts:
        enc = tokenizer(t, add_special_tokens=False, return_offsets_mapping=True)
        offs = enc["offset_mapping"]
        cut = None
        for i in range(min(n_tokens, len(offs) - 1), 0, -1):
            start = offs[i][0]
            if 0 < start < len(t) and t[start] == " ":  # byte-level BPE: the token carries its space
                cut = start
                break
            if start > 0 and t[start - 1] == " ":  # offsets trimmed past the space
                cut = start - 1
                break
        out.append((t[:cut], t[cut:]) if cut else ("", ""))
    return out


def _words(text: str, n: int) -> str:
    return " " + " ".join(text.split()[:n]) if text.strip() else ""


def imdb_pairs(reviews: Reviews, tokenizer, cfg: RLHFConfig, rng: np.random.Generator) -> Pairs:
    """Offline pairs from one client's labelled reviews: the opening of a positive review with its own
    continuation (chosen) against a negative review's continuation (rejected), ``max_new_tokens`` words each."""
    pos = np.flatnonzero(reviews.label == 1)
    neg = np.flatnonzero(reviews.label == 0)
    n = min(len(pos), len(neg))
    pos, neg = rng.permutation(pos)[:n], rng.permutation(neg)[:n]
    cuts_pos = token_prefix([reviews.text[i] for i in pos], tokenizer, cfg.prompt_tokens)
    cuts_neg = token_prefix([reviews.text[i] for i in neg], tokenizer, cfg.prompt_tokens)
    prompt, chosen, rejected, ids = [], [], [], []
    for i, (p, c), (_, r) in zip(pos, cuts_pos, cuts_neg, strict=True):
        if p and c.strip() and r.strip():
            prompt.append(p)
            chosen.append(_words(c, cfg.max_new_tokens))
            rejected.append(_words(r, cfg.max_new_tokens))
            ids.append(reviews.ids[i])
    return Pairs(prompt, chosen, rejected, np.asarray(ids, dtype=np.int64))


def imdb_split(cfg: RLHFConfig, data_dir: Path | None, tokenizer, seed: int) -> tuple[RLHFSplit, Reviews]:
    """Client shards of labelled training reviews, public-pool prompts, held-out test prompts and judge data."""
    train, test = load_reviews("local" if cfg.data == "imdb" else cfg.data, data_dir)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x1DB]))
    need = cfg.clients * cfg.reviews_per_client + cfg.public_reviews
    if need > len(train):
        raise InputError(f"task: clients × reviews_per_client + public_reviews = {need} training reviews needed, the data has {len(train)}")
    order = rng.permutation(len(train))
    shards = [train.take(np.sort(s)) for s in np.split(order[: cfg.clients * cfg.reviews_per_client], cfg.clients)]
    public = train.take(order[cfg.clients * cfg.reviews_per_client : need])
    need_test = cfg.eval_classifier_reviews + cfg.clients * cfg.eval_prompts * 2
    if need_test > len(test):
        raise InputError(
            f"task: eval_classifier_reviews + 2 × clients × eval_prompts = {need_test} test reviews needed, the data has {len(test)}"
        )
    t_order = rng.permutation(len(test))
    judge_train = test.take(t_order[: cfg.eval_classifier_reviews])
    rest = test.take(t_order[cfg.eval_classifier_reviews : need_test])
    held = [p for p, _ in token_prefix(rest.text, tokenizer, cfg.prompt_tokens) if p]
    if len(held) < cfg.clients * cfg.eval_prompts:
        raise InputError(f"task: only {len(held)} test reviews give a prompt; {cfg.clients * cfg.eval_prompts} needed")
    eval_prompts = [held[k * cfg.eval_prompts : (k + 1) * cfg.eval_prompts] for k in range(cfg.clients)]
    public_prompts = [p for p, _ in token_prefix(public.text, tokenizer, cfg.prompt_tokens) if p]
    clients = []
    for k, shard in enumerate(shards):
        pair_rng = np.random.default_rng(np.random.SeedSequence([seed, k, 0xBA125]))
        clients.append(ClientData(public_prompts[k :: cfg.clients], imdb_pairs(shard, tokenizer, cfg, pair_rng), shard))
    empty = Pairs([], [], [], np.zeros(0, np.int64))
    split = RLHFSplit(clients, eval_prompts, [empty] * cfg.clients, judge_train, rest, extras={"public_ids": public.ids})
    return split, train
