"""IMDb reviews (Maas et al. 2011) through ``datasets``, split into who may see what.

* **client shards**: ``clients`` disjoint sets of labelled training reviews, each client's private
  human feedback (its reward classifier is trained on them, optionally with DP-SGD);
* **public pool**: other training reviews no client holds, used without labels for the
  tokenizer, the policy's pretraining and the RL prompts, so the policy's training sees private
  data only through the reward (the post-processing argument that makes record-level DP of the
  reward classifier cover the whole local step);
* **held-out test reviews**: the evaluation classifier's training set, and, disjoint from it, the
  evaluation prompts. No client's reward ever sees a test review.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import IMDbConfig

HUB_NAME = "stanfordnlp/imdb"
_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
_SPACE = re.compile(r"\s+")


def clean(text: str) -> str:
    """IMDb reviews carry HTML line breaks; the policy should not learn to emit them."""
    return _SPACE.sub(" ", _BREAK.sub(" ", text)).strip()


@dataclass(frozen=True)
class Reviews:
    text: list[str]
    label: np.ndarray
    """1 = positive, 0 = negative."""
    rating: np.ndarray
    """Star rating 1-10 (IMDb's own; 0 when the source has none)."""
    ids: np.ndarray | None = None
    """Stable review ids: positions in the loaded split (default ``0..n-1``), kept by :meth:`take`
    so a review can be found again (the audits' record ids, :mod:`fedrlhf_secure.tasks.auditable`)."""

    def __post_init__(self) -> None:
        if self.ids is None:
            object.__setattr__(self, "ids", np.arange(len(self.text), dtype=np.int64))

    def __len__(self) -> int:
        return len(self.text)

    def take(self, idx: np.ndarray) -> Reviews:
        idx = np.asarray(idx, dtype=np.int64)
        return Reviews([self.text[i] for i in idx], self.label[idx], self.rating[idx], self.ids[idx])

    @staticmethod
    def concat(parts: list[Reviews]) -> Reviews:
        return Reviews(
            [t for p in parts for t in p.text],
            np.concatenate([p.label for p in parts]).astype(np.int64),
            np.concatenate([p.rating for p in parts]).astype(np.int64),
            np.concatenate([p.ids for p in parts]).astype(np.int64),
        )


@dataclass(frozen=True)
class IMDbSplit:
    shards: list[Reviews]
    public: Reviews
    eval_classifier: Reviews
    eval_prompts: Reviews


def _from_dataset(ds, source: str) -> Reviews:
    missing = {"text", "label"} - set(ds.column_names)
    if missing:
        raise ValueError(f"{source}: IMDb data needs columns text and label; missing {sorted(missing)} (has {ds.column_names})")
    labels = np.asarray(ds["label"], dtype=np.int64)
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{source}: column label must be 0 (negative) or 1 (positive), found {sorted(set(labels.tolist()))[:5]}")
    rating = np.asarray(ds["rating"], dtype=np.int64) if "rating" in ds.column_names else np.zeros(len(labels), np.int64)
    return Reviews([clean(t) for t in ds["text"]], labels, rating)


def load_reviews(dataset: str, data_dir: Path | None) -> tuple[Reviews, Reviews]:
    """(train, test) from ``DATA_DIR/imdb/{train,test}.parquet`` (``dataset: local``) or the hub."""
    import datasets

    if dataset == "local":
        if data_dir is None:
            raise FileNotFoundError("task.dataset=local needs a data directory: pass --data-dir or set FEDRLHF_DATA_DIR")
        out = []
        for split in ("train", "test"):
            path = Path(data_dir) / "imdb" / f"{split}.parquet"
            if not path.is_file():
                raise FileNotFoundError(f"IMDb {split} split not found: expected {path} (columns text, label)")
            ds = datasets.load_dataset("parquet", data_files={split: str(path)}, split=split)
            out.append(_from_dataset(ds, str(path)))
        return out[0], out[1]
    ds = datasets.load_dataset(dataset)
    return _from_dataset(ds["train"], f"{dataset}[train]"), _from_dataset(ds["test"], f"{dataset}[test]")


def split_reviews(train: Reviews, test: Reviews, config: IMDbConfig, seed: int) -> IMDbSplit:
    """Seeded disjoint split; see the module docstring for who sees which part."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x1DB]))
    need = config.clients * config.reviews_per_client + config.public_reviews
    if need > len(train):
        raise ValueError(f"task: clients × reviews_per_client + public_reviews = {need} training reviews needed, the data has {len(train)}")
    order = rng.permutation(len(train))
    client_part, public_idx = order[: need - config.public_reviews], order[need - config.public_reviews : need]
    if config.partition == "by_rating":
        # Sort the clients' reviews by star rating (ties broken by the random order), so client 0
        # holds the most negative band and client K-1 the most positive one.
        client_part = client_part[np.argsort(train.rating[client_part], kind="stable")]
    shards = [train.take(np.sort(s)) for s in np.split(client_part, config.clients)]

    need_test = config.eval_classifier_reviews + config.clients * config.eval_prompts
    if need_test > len(test):
        raise ValueError(
            f"task: eval_classifier_reviews + clients × eval_prompts = {need_test} test reviews needed, the data has {len(test)}"
        )
    t_order = rng.permutation(len(test))
    eval_cls = test.take(t_order[: config.eval_classifier_reviews])
    eval_prompts = test.take(t_order[config.eval_classifier_reviews : need_test])
    return IMDbSplit(shards, train.take(public_idx), eval_cls, eval_prompts)


def prompts_from(texts: list[str], tokenizer, prompt_tokens: int) -> list[str]:
    """The first ``prompt_tokens`` tokens of each review, decoded back to text (what TRL takes)."""
    ids = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=prompt_tokens)["input_ids"]
    return [tokenizer.decode(i) for i in ids if i]
