"""FedRLHF on MovieLens: the :class:`~fedrlhf_secure.tasks.base.Task` the engine drives.

Each client owns the ratings of its user(s), a simulated human per user (:mod:`.feedback`) and the
users' **personal** embeddings, which live only in :class:`MovieLensClient` and never in a
:class:`~fedrlhf_secure.tasks.base.FitResult`. A fit trains a compact copy of the policy holding
only the item rows the client rated, so the rows it did not rate have an exactly zero delta (no
gradient, no Adam moment, no weight decay reaches them) and ``touched_rows`` says which rows moved.

Under record-level DP the set of items a client rated is itself private (each user rates an item at
most once, so "row i moved" reveals the record (user, i)). A DP fit therefore trains the *full*
item table, the DP-SGD engine adds noise to every row, and ``touched_rows`` is all-True: every released
coordinate the data could influence carries noise, and the released shape of the update does not
depend on the data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ...configtypes import ConfigError
from ...errors import InputError
from ...privacy.distributed_dpsgd import GradientSumSettings
from ...privacy.dpsgd import DPSGDReport
from ...privacy.randomness import secret_key
from ..auditable import AuditableTask, CanarySet, Candidates
from ..base import FitConfig, FitResult, ParamSpec, Task, TaskClient
from .config import MovieLensConfig
from .data import MovieLensSplit, Ratings, load_split
from .feedback import FeedbackProfile, KeyedHumanNoise, draw_profiles, labels
from .gradients import gradient_sum_fit
from .metrics import evaluate_scores
from .model import ITEM_EMBEDDING, PolicyDims, build_policy, numpy_logits, torch_logits
from .train import LocalData, ProfileTable, TrainSettings, draw_phase, fit_personal, train_epochs, train_epochs_dp

if TYPE_CHECKING:
    from .batched import BatchedJob, BatchedOutcome

CANARY_RATINGS = (1.0, 5.0)
"""Canary ratings are drawn from the extremes so the label ("high" = rating >= 4) is unambiguous."""


def _concat(a: Ratings, b: Ratings) -> Ratings:
    return Ratings(np.r_[a.user, b.user], np.r_[a.item, b.item], np.r_[a.rating, b.rating].astype(np.float32))


def _group_by(keys: np.ndarray, values: np.ndarray) -> dict[int, np.ndarray]:
    """``{key: values with that key}`` (order kept), skipping key -1 (records of unselected users)."""
    order = np.argsort(keys, kind="stable")
    keys, values = keys[order], values[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, dtype=np.int64)
    ends = np.r_[starts[1:], len(keys)]
    return {int(keys[s]): values[s:e] for s, e in zip(starts, ends, strict=False) if keys[s] >= 0}


class MovieLensTask(Task, AuditableTask):
    """Clients = groups of ``users_per_client`` users (one per user by default), optionally a seeded
    sample of ``num_clients`` of them; each trains on its users' training ratings."""

    name = "movielens"

    def __init__(self, config: MovieLensConfig, split: MovieLensSplit, seed: int, *, train_keep: np.ndarray | None = None) -> None:
        self.config = config
        self.split = split
        self.seed = seed
        cat = split.catalogue
        self.dims = PolicyDims(
            num_items=cat.num_items,
            num_genres=len(cat.genre_names),
            user_dim=config.user_dim,
            item_dim=config.item_dim,
            genre_dim=config.genre_dim,
            hidden_dim=config.hidden_dim,
        )
        groups = [np.arange(s, min(s + config.users_per_client, cat.num_users)) for s in range(0, cat.num_users, config.users_per_client)]
        if config.num_clients is not None:
            if config.num_clients > len(groups):
                unit = "users" if config.users_per_client == 1 else f"clients of {config.users_per_client} users"
                raise ConfigError(
                    f"must be at most {len(groups)}: the data ({split.source}) has only {len(groups)} {unit}, got {config.num_clients}",
                    key="task.num_clients",
                )
            chosen = np.sort(np.random.default_rng([seed, 0xC11E]).choice(len(groups), config.num_clients, replace=False))
        else:
            chosen = np.arange(len(groups))
        self._client_users = {int(c): groups[c] for c in chosen}
        owner = np.full(cat.num_users, -1, dtype=np.int64)
        for cid, users in self._client_users.items():
            owner[users] = cid
        in_train = owner[split.train.user] >= 0
        self._train_index = np.flatnonzero(in_train)  # positions in split.train of the federation's records
        self._keep = np.ones(len(self._train_index), dtype=bool) if train_keep is None else np.asarray(train_keep, bool)
        if self._keep.shape != self._train_index.shape:
            raise ValueError(f"train_keep has shape {self._keep.shape}, training_records() has {len(self._train_index)} rows")
        self._owner = owner
        self._positions: tuple[dict[int, np.ndarray], dict[int, np.ndarray]] | None = None
        self.profiles: dict[int, FeedbackProfile] = draw_profiles(
            list(self._client_users), seed, tuple(config.feedback_lambda), tuple(config.feedback_noise), config.pairwise_flip
        )
        self.settings = TrainSettings(
            config.lr,
            config.weight_decay,
            config.batch_size,
            config.objective,
            config.temperature,
            config.user_lr,
            config.item_lr,
            config.personal_epochs,
        )
        self._initial = self.dims.init_shared(seed, config.embedding_scale)
        torch.set_num_threads(config.torch_threads)

    # --- Task interface -------------------------------------------------------------------------
    def client_ids(self) -> list[int]:
        return list(self._client_users)

    def shared_spec(self) -> ParamSpec:
        return self.dims.spec()

    def initial_shared(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._initial.items()}

    def make_client(self, client_id: int) -> MovieLensClient:
        if client_id not in self._client_users:
            raise KeyError(f"unknown MovieLens client {client_id}")
        users = self._client_users[client_id]
        if self._positions is None:  # record positions per client, computed once for all clients
            kept = self._train_index[self._keep]
            self._positions = (
                _group_by(self._owner[self.split.train.user[kept]], kept),
                _group_by(self._owner[self.split.test.user], np.arange(len(self.split.test))),
            )
        empty = np.zeros(0, dtype=np.int64)
        train_pos = self._positions[0].get(client_id, empty)
        test_pos = self._positions[1].get(client_id, empty)
        return MovieLensClient(self, client_id, users, self.split.train.subset(train_pos), self.split.test.subset(test_pos))

    def fit_clients(
        self,
        fits: Sequence[tuple[TaskClient, FitConfig]],
        shared: Mapping[str, np.ndarray],
        on_fit: Callable[[int], None] | None = None,
    ) -> list[FitResult]:
        """The clients' fits, those without DP-SGD trained as one batched computation
        (:func:`.batched.train_batched`: the same result as each ``client.fit``, up to floating-point
        summation order); record-level DP-SGD fits (the ``privacy.per_sample`` engine) and empty clients run one by one."""
        from .batched import train_batched

        jobs = {i: c.batched_job(shared, cfg) for i, (c, cfg) in enumerate(fits) if isinstance(c, MovieLensClient)}
        batch = [i for i, job in jobs.items() if job is not None]
        results: list[FitResult | None] = [None] * len(fits)
        for i, out in zip(batch, train_batched(shared, [jobs[i] for i in batch], self.settings), strict=True):
            client = fits[i][0]
            assert isinstance(client, MovieLensClient)
            results[i] = client.batched_result(shared, out)
            if on_fit is not None:
                on_fit(i)
        for i, (client, cfg) in enumerate(fits):
            if results[i] is None:
                results[i] = client.fit(shared, cfg)
                if on_fit is not None:
                    on_fit(i)
        return results  # type: ignore[return-value]

    def baselines(self) -> Mapping[str, Callable[..., dict[str, Any]]]:
        """``{"centralized": fn, "local": fn, "majority": fn}``; ``fn(rounds=None, local_epochs=None)`` (defaults:
        ``baseline_rounds``/``baseline_local_epochs`` of the task config; the engine passes the
        federation's own so the comparison is at equal training)."""
        from .baselines import centralized, local_only, majority

        return {
            "centralized": lambda rounds=None, local_epochs=None: centralized(self, rounds, local_epochs),
            "local": lambda rounds=None, local_epochs=None: local_only(self, rounds, local_epochs),
            "majority": lambda rounds=None, local_epochs=None: majority(self, rounds, local_epochs),
        }

    # --- AuditableTask (membership-inference audits, :mod:`attacks`) --------------------------
    def training_records(self) -> np.ndarray:
        """(N, 3) int64 ``(user_id, item_id, rating)`` of every training record of the federation's
        clients, raw ids as in the data files, in the order of the split file. Half-star ratings
        are floored (the label ``rating >= 4`` is unchanged by flooring). Rows removed by
        :meth:`with_records` are still listed: the order never changes."""
        tr = self.split.train
        cat = self.split.catalogue
        pos = self._train_index
        return np.stack([cat.user_ids[tr.user[pos]], cat.item_ids[tr.item[pos]], np.floor(tr.rating[pos]).astype(np.int64)], axis=1).astype(
            np.int64
        )

    def with_records(self, keep: np.ndarray) -> MovieLensTask:
        """The same task (same clients, held-out set, feedback profiles and initial parameters)
        training only on the records ``training_records()[keep]`` (and none this task already left out)."""
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != self._keep.shape:
            raise ValueError(f"keep has shape {keep.shape}, training_records() has {len(self._keep)} rows")
        return MovieLensTask(self.config, self.split, self.seed, train_keep=keep & self._keep)

    with_training_subset = with_records

    def record_scores(
        self,
        shared: Mapping[str, np.ndarray],
        records: np.ndarray,
        personal: Mapping[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """The logit of each record's *true* label, ``z`` if rating >= 4 else ``-z`` (higher = the
        model is more confident in the truth, the usual membership-inference score).

        ``records`` is (N, 3) ``(user_id, item_id, rating)`` as from :meth:`training_records`.
        ``personal`` maps ``"user_id"`` -> personal embedding (e.g. from
        :meth:`MovieLensClient.personal_state`); users missing from it, or all users when None,
        get the neutral zero vector, the mean of the embeddings' initial distribution."""
        records = np.asarray(records)
        cat = self.split.catalogue
        items = self._item_rows(records)
        users = np.zeros((len(records), self.dims.user_dim), dtype=np.float32)
        if personal:
            for row, uid in enumerate(records[:, 0]):
                vec = personal.get(str(int(uid)))
                if vec is not None:
                    users[row] = vec
        z = numpy_logits(shared, users, items, cat.genres[items])
        return np.where(labels(records[:, 2]) == 1.0, z, -z).astype(np.float32)

    def membership_candidates(self) -> Candidates:
        """Members: the federation users' training records; non-members: the same users' held-out
        records. The candidate task trains on both (held-out ones listed after the training ones,
        in split order) and keeps the held-out set for evaluation."""
        members = self.training_records()
        task = self._over_training(_concat(self.split.train, self.split.test))
        records = task.training_records()
        member = np.zeros(len(records), dtype=bool)
        member[: len(members)] = True
        if not np.array_equal(records[: len(members)], members):
            raise RuntimeError("candidate records do not start with the audited run's training records (record order changed?)")
        return Candidates(task, member)

    def with_canaries(self, num_canaries: int, rng: np.random.Generator) -> CanarySet:
        """``num_canaries`` extra ratings on the least-rated items (ties broken by ``rng``), one per
        item, each by a random federation user with a rating drawn from :data:`CANARY_RATINGS`; all
        ordinary ratings of those items are removed, so an item's embedding row is moved by its
        canary alone (the strongest signal one record can carry in this model; Steinke et al. 2023,
        §6: many canaries, each easy to detect). The canaries are the last training records."""
        split = self.split
        cat = split.catalogue
        users = np.flatnonzero(self.client_of_user(np.arange(cat.num_users)) >= 0)  # the federation's users
        if num_canaries > cat.num_items:
            raise InputError(f"--canaries {num_canaries}: each canary needs its own item; {split.source} has {cat.num_items} items")
        in_fed = self.client_of_user(split.train.user) >= 0
        counts = np.bincount(split.train.item[in_fed], minlength=cat.num_items)
        order = np.lexsort((rng.random(cat.num_items), counts))  # least-rated first, ties at random
        items = np.sort(order[:num_canaries])
        canaries = Ratings(
            rng.choice(users, size=num_canaries).astype(np.int64),
            items.astype(np.int64),
            rng.choice(np.asarray(CANARY_RATINGS, dtype=np.float32), size=num_canaries),
        )
        ordinary = split.train.subset(~np.isin(split.train.item, items))
        task = self._over_training(_concat(ordinary, canaries))
        records = task.training_records()
        index = np.arange(len(records) - num_canaries, len(records))
        return CanarySet(task, records[index], index)

    def canary_scores(self, released: Mapping[str, np.ndarray], canaries: np.ndarray) -> np.ndarray:
        """How far each canary's item embedding row moved from its public initial value (L2). Only
        the canary can move that row (no other record rates the item), so without noise the score is
        exactly 0 when the canary was left out; DP noise moves every row alike."""
        initial = self.initial_shared()[ITEM_EMBEDDING]
        rows = self._item_rows(canaries)
        moved = released[ITEM_EMBEDDING][rows].astype(np.float64) - initial[rows].astype(np.float64)
        return np.linalg.norm(moved, axis=1)

    def record_clients(self, records: np.ndarray) -> np.ndarray:
        """The client of each record's user (-1 for users outside the federation or unknown ids)."""
        user_pos = {int(u): i for i, u in enumerate(self.split.catalogue.user_ids)}
        pos = np.array([user_pos.get(int(u), -1) for u in np.asarray(records)[:, 0]], dtype=np.int64)
        return np.where(pos >= 0, self.client_of_user(np.maximum(pos, 0)), -1).astype(np.int64)

    def record_rows(self, records: np.ndarray) -> dict[str, np.ndarray]:
        """A rating can move only its item's embedding row (the ``sparse_rows`` parameter)."""
        return {ITEM_EMBEDDING: self._item_rows(records)}

    def with_num_clients(self, num_clients: int) -> MovieLensTask:
        """The task of ``task.num_clients = num_clients`` on the same split and seed (what the
        registered factory builds from a config with that setting)."""
        return MovieLensTask(replace(self.config, num_clients=num_clients), self.split, self.seed)

    def _over_training(self, train: Ratings) -> MovieLensTask:
        """This task (same config, catalogue, held-out set and seed) over other training ratings."""
        return MovieLensTask(self.config, replace(self.split, train=train), self.seed)

    def _item_rows(self, records: np.ndarray) -> np.ndarray:
        item_pos = {int(m): i for i, m in enumerate(self.split.catalogue.item_ids)}
        try:
            return np.fromiter((item_pos[int(m)] for m in np.asarray(records)[:, 1]), dtype=np.int64, count=len(records))
        except KeyError as exc:
            raise ValueError(f"record item_id {exc.args[0]} is not in the catalogue") from None

    # --- helpers for clients and baselines ------------------------------------------------------
    def initial_user_rows(self, users: np.ndarray) -> np.ndarray:
        return np.stack([self.dims.init_user(self.seed, int(u), self.config.embedding_scale) for u in users])

    def client_of_user(self, users: np.ndarray) -> np.ndarray:
        return self._owner[users]


class MovieLensClient(TaskClient):
    def __init__(self, task: MovieLensTask, client_id: int, users: np.ndarray, train: Ratings, test: Ratings) -> None:
        self.task = task
        self.client_id = client_id
        self.users = users
        self.train = train
        self.test = test
        self._user_rows = task.initial_user_rows(users)  # personal: never returned by fit()
        self._dp_user_rows = self._user_rows.copy()  # personal, trained only by DP-SGD (see fit)
        self.feedback_profiles = ProfileTable.of([task.profiles[client_id]])
        self._human_key = secret_key()  # keys the simulated human's per-record noise under DP (never the run seed)
        user_pos = np.searchsorted(users, train.user)
        self.local_items = np.unique(train.item)
        genres = task.split.catalogue.genres
        self.local_data = LocalData(
            user_pos=torch.from_numpy(user_pos),
            item_pos=torch.from_numpy(np.searchsorted(self.local_items, train.item)),
            genres=torch.from_numpy(genres[train.item]),
            ratings=train.rating,
            labels=labels(train.rating),
            profile_index=np.zeros(len(train), dtype=np.int64),
            user_key=train.user,
        )
        self._dp_data = replace(self.local_data, item_pos=torch.from_numpy(train.item))
        self._test_genres = genres[test.item]
        self._train_genres = genres[train.item]

    def num_examples(self) -> int:
        return len(self.train)

    def personal_state(self) -> dict[str, np.ndarray]:
        """``"user_id"`` -> this client's personal user embedding (a copy; for the client's own
        checkpoint, for audits of stronger threat models and for :meth:`MovieLensTask.record_scores`)."""
        ids = self.task.split.catalogue.user_ids
        state = {str(int(ids[u])): self._user_rows[i].copy() for i, u in enumerate(self.users)}
        state.update({f"dp/{int(ids[u])}": self._dp_user_rows[i].copy() for i, u in enumerate(self.users)})
        return state

    def load_personal_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore :meth:`personal_state` (``fedrlhf run --resume``); every user of this client must be present."""
        ids = self.task.split.catalogue.user_ids
        rows, dp_rows = self._user_rows.copy(), self._dp_user_rows.copy()
        for i, u in enumerate(self.users):
            for table, key in ((rows, str(int(ids[u]))), (dp_rows, f"dp/{int(ids[u])}")):
                if key not in state:
                    raise ValueError(f"client {self.client_id}: checkpoint has no personal embedding {key!r}")
                vec = np.asarray(state[key], dtype=np.float32)
                if vec.shape != table[i].shape:
                    raise ValueError(f"client {self.client_id}: embedding {key!r} has shape {vec.shape}, expected {table[i].shape}")
                table[i] = vec
        self._user_rows, self._dp_user_rows = rows, dp_rows

    def _fit_rng(self, config: FitConfig) -> np.random.Generator:
        return np.random.default_rng([config.seed, config.round, self.client_id, 0xF17])

    def batched_job(self, shared: Mapping[str, np.ndarray], config: FitConfig) -> BatchedJob | None:
        """This fit as one job of :func:`.batched.train_batched` (the data and rewards drawn from
        the same generator, in the same order, as :meth:`fit`), or None when it is not batched:
        record-level DP-SGD or no training records."""
        from .batched import BatchedJob

        if config.dp_sgd is not None or len(self.train) == 0:
            return None
        rng, s = self._fit_rng(config), self.task.settings
        personal = draw_phase(self.local_data, self.feedback_profiles, s.batch_size, s.personal_epochs, rng)
        shared_phase = draw_phase(self.local_data, self.feedback_profiles, s.batch_size, config.local_epochs, rng)
        items = np.asarray(shared[ITEM_EMBEDDING][self.local_items], dtype=np.float32)
        return BatchedJob(self._user_rows.astype(np.float32), items, self.local_data, personal, shared_phase)

    def batched_result(self, shared: Mapping[str, np.ndarray], out: BatchedOutcome) -> FitResult:
        """The :class:`FitResult` of a batched job (what :meth:`fit` returns); keeps the trained
        personal embedding here."""
        num_items = self.task.dims.num_items
        item_delta = np.zeros((num_items, self.task.dims.item_dim), dtype=np.float32)
        item_delta[self.local_items] = out.item_rows - shared[ITEM_EMBEDDING][self.local_items]
        touched = np.zeros(num_items, dtype=bool)
        touched[self.local_items] = True
        self._user_rows = out.user_rows.copy()
        delta = {ITEM_EMBEDDING: item_delta}
        for name, value in out.dense.items():
            delta[name] = (value - shared[name]).astype(np.float32)
        metrics = {"steps": float(out.steps), "loss": out.loss}
        return FitResult(delta, len(self.train), {ITEM_EMBEDDING: touched}, metrics=metrics)

    def fit(self, shared: Mapping[str, np.ndarray], config: FitConfig) -> FitResult:
        spec = self.task.shared_spec()
        rng = self._fit_rng(config)
        num_items = self.task.dims.num_items
        if isinstance(config.dp_sgd, GradientSumSettings):  # distributed DP-SGD: one clipped gradient sum, no local steps
            return gradient_sum_fit(self, shared, config, rng)
        if len(self.train) == 0:
            delta = {e.name: np.zeros(e.shape, dtype=np.float32) for e in spec.entries}
            touched = np.zeros(num_items, dtype=bool) if config.dp_sgd is None else np.ones(num_items, dtype=bool)
            return FitResult(delta, 0, {ITEM_EMBEDDING: touched}, dp_sgd=self._dp_report(config, 0))
        if config.dp_sgd is None:
            policy = build_policy(shared, self._user_rows, self.local_items)
            steps, loss = train_epochs(policy, self.local_data, self.feedback_profiles, self.task.settings, config.local_epochs, rng)
            item_delta = np.zeros((num_items, self.task.dims.item_dim), dtype=np.float32)
            item_delta[self.local_items] = policy.item_rows() - shared[ITEM_EMBEDDING][self.local_items]
            touched = np.zeros(num_items, dtype=bool)
            touched[self.local_items] = True
            privacy = None
            self._user_rows = policy.user_embedding.weight.detach().numpy().copy()
        else:
            self._user_rows = self._fit_prediction_embedding(shared, rng)
            policy = build_policy(shared, self._dp_user_rows, None, item_scale=self.task.config.dp_item_scale)
            steps, loss = train_epochs_dp(
                policy,
                self._dp_data,
                self.feedback_profiles,
                self.task.settings,
                config.local_epochs,
                config.dp_sgd,
                human=KeyedHumanNoise(self._human_key, config.round),
            )
            item_delta = policy.item_rows() - shared[ITEM_EMBEDDING]
            touched = np.ones(num_items, dtype=bool)
            privacy = self._dp_report(config, steps)
            self._dp_user_rows = policy.user_embedding.weight.detach().numpy().copy()
        dense = policy.dense_state()
        delta = {ITEM_EMBEDDING: item_delta.astype(np.float32)}
        for name, value in dense.items():
            delta[name] = (value - shared[name]).astype(np.float32)
        return FitResult(delta, len(self.train), {ITEM_EMBEDDING: touched}, metrics={"steps": float(steps), "loss": loss}, dp_sgd=privacy)

    def _fit_prediction_embedding(self, shared: Mapping[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
        """Under record-level DP: the user embedding this client predicts with, fitted *without*
        noise to the received global model (the personal phase of FedRep).

        Why this is allowed: DP constrains what leaves the client. This embedding never does, and
        nothing that leaves is computed from it: the DP-SGD fit below starts from its own user
        embedding (``_dp_user_rows``), trained only by DP-SGD, so the update is a DP mechanism
        of the data and the received (public) model. The client's own predictions are about its
        own user, and under DP their evaluation numbers stay on the client too
        (:class:`~fedrlhf_secure.federation.participant.PlaintextPolicy`; SECURITY.md §11). Nor
        does this phase move the DP phase's randomness: the simulated human's noise there is keyed
        per record (:class:`.feedback.KeyedHumanNoise`), not drawn from this phase's generator."""
        policy = build_policy(shared, self._user_rows, self.local_items)
        fit_personal(policy, self.local_data, self.feedback_profiles, self.task.settings, rng)
        return policy.user_embedding.weight.detach().numpy().copy()

    @staticmethod
    def _dp_report(config: FitConfig, steps: int) -> DPSGDReport | None:
        return None if config.dp_sgd is None else DPSGDReport.of(config.dp_sgd, steps)

    def scores(self, shared: Mapping[str, np.ndarray], ratings: Ratings, genres: np.ndarray) -> np.ndarray:
        user_vectors = self._user_rows[np.searchsorted(self.users, ratings.user)]
        return torch_logits(shared, user_vectors, ratings.item, genres)

    def evaluate(self, shared: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Held-out ``correct``/``n``/``accuracy``, training ``train_correct``/``train_n``/``train_accuracy``
        (the paper's metric, for comparison only) and ``spearman``: the rank correlation between the
        predicted scores and the true held-out ratings (NaN when undefined: fewer than 2 held-out
        records or constant ratings/scores; pool it with ``nanmean``)."""
        return evaluate_scores(
            self.scores(shared, self.test, self._test_genres),
            self.test.rating,
            self.scores(shared, self.train, self._train_genres),
            self.train.rating,
        )


def make_task(config: MovieLensConfig, data_dir: Path | None, seed: int) -> MovieLensTask:
    """The registered factory: ``factory(config, data_dir, seed)``."""
    split = load_split(data_dir, config.split, config.holdout_fraction, seed, config.validation)
    return MovieLensTask(config, split, seed)
