"""Generated IMDb-format data (Parquet with text, label, rating) and a tiny task config for the IMDb tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

POSITIVE = ["great", "wonderful", "loved", "excellent", "best", "beautiful", "brilliant", "enjoyed"]
NEGATIVE = ["awful", "boring", "worst", "terrible", "waste", "bad", "stupid", "dull"]
FILLER = ["the", "movie", "film", "was", "and", "acting", "plot", "story", "it", "a", "of", "character", "this", "i"]


def write_imdb_parquet(root: Path, n_train: int = 600, n_test: int = 400, seed: int = 0) -> Path:
    """``root/imdb/{train,test}.parquet``: half positive, half negative reviews of 20-40 words."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    (root / "imdb").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % 2
        texts, ratings = [], []
        for label in labels:
            words = list(rng.choice(FILLER, size=int(rng.integers(20, 40))))
            sentiment = POSITIVE if label else NEGATIVE
            for pos in rng.choice(len(words), size=4, replace=False):
                words[pos] = str(rng.choice(sentiment))
            texts.append(" ".join(words).capitalize() + ".<br /><br />The end.")
            ratings.append(int(rng.integers(7, 11)) if label else int(rng.integers(1, 5)))
        table = pa.table(
            {
                "text": texts,
                "label": labels.astype(np.int64),
                "rating": np.asarray(ratings, np.int8),
                "id": [f"{split}/{i}" for i in range(n)],
            }
        )
        pq.write_table(table, root / "imdb" / f"{split}.parquet")
    return root


def tiny_task_mapping(**overrides) -> dict:
    """The ``task:`` section of a config small enough for unit tests (seconds, not minutes)."""
    task = {
        "kind": "imdb",
        "clients": 2,
        "reviews_per_client": 100,
        "public_reviews": 200,
        "prompt_tokens": 4,
        "vocab_size": 512,
        "policy": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32, "pretrain_steps": 10, "pretrain_batch": 4},
        "lora_rank": 2,
        "lambdas": [0.2, 0.8],
        "preferences": ["length", "topic"],
        "rl_steps": 1,
        "prompts_per_step": 2,
        "num_generations": 2,
        "max_new_tokens": 6,
        "eval_prompts": 4,
        "eval_classifier_reviews": 200,
        "samples_per_client": 2,
        "torch_threads": 1,
    }
    task.update(overrides)
    return task
