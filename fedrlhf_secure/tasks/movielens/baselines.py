"""The two reference points for a federated run, on the same split, model, reward and initialisation.

* **centralized**: every training record in one place and one policy (all user embeddings, the whole
  item table), trained jointly on the same shaped reward (each record shaped by its own user's
  simulated human and ``λ_k``) for rounds × local epochs epochs. The upper reference federation tries to approach.
* **local-only**: each client trains alone from the same initial parameters, running its federated
  local schedule ``rounds`` times without any aggregation, and is evaluated with its own copy.
  The lower reference: what a user gets without federation.

Both report pooled held-out accuracy (the primary metric), training accuracy (the paper's
metric), mean per-client Spearman personalisation score and wall-clock seconds.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .feedback import labels
from .metrics import evaluate_scores
from .model import ITEM_EMBEDDING, build_policy, numpy_logits
from .train import LocalData, ProfileTable, train_epochs

if TYPE_CHECKING:
    from .task import MovieLensTask


def _pool(per_client: list[dict[str, float]]) -> dict[str, float]:
    correct = sum(m["correct"] for m in per_client)
    n = sum(m["n"] for m in per_client)
    train_correct = sum(m["train_correct"] for m in per_client)
    train_n = sum(m["train_n"] for m in per_client)
    rho = np.array([m["spearman"] for m in per_client], dtype=np.float64)
    acc = np.array([m["accuracy"] for m in per_client if m["n"] > 0], dtype=np.float64)
    return {
        "heldout_accuracy": correct / n if n else float("nan"),
        "train_accuracy": train_correct / train_n if train_n else float("nan"),
        "heldout_n": int(n),
        "train_n": int(train_n),
        "spearman_mean": float(np.nanmean(rho)) if np.isfinite(rho).any() else float("nan"),
        "client_accuracy_std": float(acc.std()) if len(acc) else float("nan"),
    }


def centralized(task: MovieLensTask, rounds: int | None = None, local_epochs: int | None = None) -> dict[str, Any]:
    """One policy on all training records for ``rounds × local_epochs`` epochs (joint schedule)."""
    start = time.perf_counter()
    epochs = (rounds or task.config.baseline_rounds) * (local_epochs or task.config.baseline_local_epochs)
    clients = [task.make_client(cid) for cid in task.client_ids()]
    users = np.concatenate([c.users for c in clients])
    cat = task.split.catalogue
    user_pos = {int(u): i for i, u in enumerate(users)}
    train_user = np.concatenate([c.train.user for c in clients])
    train_item = np.concatenate([c.train.item for c in clients])
    ratings = np.concatenate([c.train.rating for c in clients])
    profile_index = np.concatenate([np.full(len(c.train), k, dtype=np.int64) for k, c in enumerate(clients)])
    data = LocalData(
        user_pos=torch.from_numpy(np.fromiter((user_pos[int(u)] for u in train_user), np.int64, len(train_user))),
        item_pos=torch.from_numpy(train_item),
        genres=torch.from_numpy(cat.genres[train_item]),
        ratings=ratings,
        labels=labels(ratings),
        profile_index=profile_index,
        user_key=train_user,
    )
    shared = task.initial_shared()
    policy = build_policy(shared, task.initial_user_rows(users), None)
    profiles = ProfileTable.of([task.profiles[c.client_id] for c in clients])
    rng = np.random.default_rng([task.seed, 0xCE47])
    train_epochs(policy, data, profiles, task.settings, epochs, rng, schedule="joint")
    trained = {ITEM_EMBEDDING: policy.item_rows(), **policy.dense_state()}
    user_rows = policy.user_embedding.weight.detach().numpy()
    per_client = []
    offset = 0
    for c in clients:
        rows = user_rows[offset : offset + len(c.users)]
        offset += len(c.users)
        z_test = numpy_logits(trained, rows[np.searchsorted(c.users, c.test.user)], c.test.item, cat.genres[c.test.item])
        z_train = numpy_logits(trained, rows[np.searchsorted(c.users, c.train.user)], c.train.item, cat.genres[c.train.item])
        per_client.append(evaluate_scores(z_test, c.test.rating, z_train, c.train.rating))
    return {**_pool(per_client), "epochs": epochs, "seconds": time.perf_counter() - start}


def local_only(task: MovieLensTask, rounds: int | None = None, local_epochs: int | None = None) -> dict[str, Any]:
    """Each client runs its federated local schedule ``rounds`` times with no aggregation in between."""
    start = time.perf_counter()
    rounds = rounds or task.config.baseline_rounds
    local_epochs = local_epochs or task.config.baseline_local_epochs
    cat = task.split.catalogue
    initial = task.initial_shared()
    per_client = []
    for cid in task.client_ids():
        c = task.make_client(cid)
        own = dict(initial)
        user_rows = task.initial_user_rows(c.users)
        if len(c.train):
            policy = build_policy(initial, user_rows, c.local_items)
            rng = np.random.default_rng([task.seed, 0x10CA, cid])
            for _ in range(rounds):
                train_epochs(policy, c.local_data, c.feedback_profiles, task.settings, local_epochs, rng)
            items = initial[ITEM_EMBEDDING].copy()
            items[c.local_items] = policy.item_rows()
            own = {ITEM_EMBEDDING: items, **policy.dense_state()}
            user_rows = policy.user_embedding.weight.detach().numpy()
        z_test = numpy_logits(own, user_rows[np.searchsorted(c.users, c.test.user)], c.test.item, cat.genres[c.test.item])
        z_train = numpy_logits(own, user_rows[np.searchsorted(c.users, c.train.user)], c.train.item, cat.genres[c.train.item])
        per_client.append(evaluate_scores(z_test, c.test.rating, z_train, c.train.rating))
    return {**_pool(per_client), "rounds": rounds, "local_epochs": local_epochs, "seconds": time.perf_counter() - start}


def majority(task: MovieLensTask, rounds: int | None = None, local_epochs: int | None = None) -> dict[str, Any]:
    """Every record predicted as the training set's majority label: what a model with no signal scores.

    The floor the plots draw: a federated model near it has learnt nothing. The schedule does not apply."""
    start = time.perf_counter()
    clients = [task.make_client(cid) for cid in task.client_ids()]
    train = np.concatenate([labels(c.train.rating) for c in clients])
    test = np.concatenate([labels(c.test.rating) for c in clients])
    guess = float(train.mean() >= 0.5)
    return {
        "heldout_accuracy": float((test == guess).mean()) if test.size else float("nan"),
        "train_accuracy": float((train == guess).mean()) if train.size else float("nan"),
        "heldout_n": int(test.size),
        "train_n": int(train.size),
        "predicted_label": int(guess),
        "seconds": time.perf_counter() - start,
    }
