"""Federated RLHF with TRL: the :class:`~fedrlhf_secure.tasks.base.Task` for ``kind: rlhf``.

One local step of client k (FedRLHF, arXiv 2412.15538, Algorithm 1, client part):

1. write the global LoRA B matrices into the policy (FFA-LoRA, :mod:`.lora`);
2. (IMDb) train its own sentiment reward a further ``local_epochs`` epochs on its own labelled reviews
   (Opacus DP-SGD when the privacy plan asks for record-level DP);
3. run one of TRL's trainers (:mod:`.trainers`): on-policy DPO on pairs its own simulated human
   picked from the current global policy's samples, offline DPO on its own pairs, or GRPO with its
   shaped reward or its own Bradley-Terry reward model;
4. return the delta of the federated tensors — the one update the participant pipeline clips,
   noises, masks or encrypts like any other.

**One policy per task process.** Clients of one process train one after another, so they share one
base model (135M parameters, 538 MB in float32) and each fit starts by overwriting the adapters
with the global ones; a client's personal state (its reward model) is its own.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import InputError
from ...privacy.dpsgd import DPSGDReport
from ..auditable import AuditableTask, CanarySet, Candidates
from ..base import FitConfig, FitResult, Metric, ParamEntry, ParamSpec, Task, TaskClient
from ..imdb.data import Reviews
from ..imdb.evaluation import EvaluationClassifier
from ..imdb.reward import SentimentClassifier, ShapedReward, encode, train_classifier, train_classifier_dp
from .config import RLHFConfig
from .data import Pairs, byod_split, imdb_split, token_prefix
from .judges import lexicon_scores
from .lora import LoRAPolicy
from .models import resolve_model, tiny_model

logger = logging.getLogger(__name__)

REVIEW_WORDS = 128
RECORD_TOKENS = 48


class RLHFTask(Task, AuditableTask):
    """Clients with their own prompts, preference pairs and (IMDb) labelled reviews; one LoRA policy.

    Audit records (:class:`~fedrlhf_secure.tasks.auditable.AuditableTask`) are the clients' private
    rows: ``(client_id, row_id, label)``, a labelled review for the IMDb preset (it trains the
    client's reward) or a preference row of the loaded data (``label`` 0) otherwise."""

    name = "rlhf"
    metrics = (
        Metric("positive_rate_mean", "positive rate (independent judge)", "fraction of held-out generations"),
        Metric("lexicon_positive_rate_mean", "positive rate (lexicon judge)", "fraction of held-out generations"),
        Metric("judge_score_mean", "judge P(positive)", "judge probability"),
        Metric("shaped_reward_mean", "shaped reward", "reward R_k = λ_k·R_sentiment + (1−λ_k)·H_k"),
        Metric("kl_to_base_mean", "KL to base model", "nats per completion"),
    )

    def __init__(self, config: RLHFConfig, data_dir: Path | None, seed: int) -> None:
        torch.set_num_threads(config.torch_threads)
        if config.on_policy and config.trainer == "dpo" and not config.imdb:
            raise InputError(
                "task.on_policy: on-policy DPO scores samples with the IMDb clients' shaped rewards; "
                "with your own preference data set task.on_policy: false (offline DPO) or task.trainer: grpo with task.reward: model"
            )
        if config.reward == "shaped" and config.trainer == "grpo" and not config.imdb:
            raise InputError("task.reward: shaped needs the IMDb preset (data: imdb); with your own data use task.reward: model")
        self.config = config
        self.seed = seed
        self.data_dir = data_dir
        self.model_path, self.tokenizer = self._model_and_tokenizer(data_dir)
        self.client_names: list[str]
        if config.imdb:
            self.split, self.train_reviews = imdb_split(config, data_dir, self.tokenizer, seed)
            self.client_names = [f"client-{k}" for k in range(config.clients)]
            self.judge: EvaluationClassifier | None = EvaluationClassifier.train(
                self.split.judge_train.text, self.split.judge_train.label, self.split.judge_check.text, self.split.judge_check.label, seed
            )
            logger.info(
                "independent judge: %.3f accurate on %d held-out test reviews", self.judge.heldout_accuracy, len(self.split.judge_check)
            )
            self.judge_threshold, self.judge_calibration = calibrate_judge(self.judge, self.split.judge_check, self.tokenizer, config)
            logger.info("independent judge at %d-token continuations: %s", config.max_new_tokens, self.judge_calibration)
        else:
            self.split, self.client_names = byod_split(config, data_dir, seed)
            self.train_reviews = None
            self.judge = None
            self.judge_threshold, self.judge_calibration = 0.5, {}
            if config.trainer == "dpo" and not all(c.pairs.has_pairs for c in self.split.clients):
                raise InputError(
                    "task.trainer: dpo needs preference rows (prompt/chosen/rejected or chosen/rejected); the data is prompt-only"
                )
        self._record_data: list[Any] = [self._client_records(k) for k in range(self.num_clients)]
        self._keep = np.ones(sum(len(r) for r in self._record_data), dtype=bool)
        self._policy: LoRAPolicy | None = None
        policy = self.policy()
        self._initial = policy.shared_state()
        self._spec = ParamSpec(tuple(ParamEntry(n, tuple(v.shape)) for n, v in self._initial.items()))
        logger.info("policy %s: %d federated LoRA parameters (%s)", config.model, self._spec.size, config.lora.scheme)

    # ------------------------------------------------------------------ construction
    @property
    def num_clients(self) -> int:
        return len(self.split.clients)

    def _model_and_tokenizer(self, data_dir: Path | None):
        from ..imdb.tokenizer import model_tokenizer

        cfg = self.config
        if cfg.model == "tiny":
            texts = self._tiny_texts(data_dir)
            path = tiny_model(cfg.tiny, texts, self.seed)
        else:
            path = resolve_model(cfg.model)
        return path, model_tokenizer(path)

    def _tiny_texts(self, data_dir: Path | None) -> list[str]:
        cfg = self.config
        if cfg.imdb:
            from ..imdb.data import load_reviews

            train, _ = load_reviews("local", data_dir)
            return train.text[:2000]
        from .data import load_rows, rows_to_pairs

        p = rows_to_pairs(load_rows(cfg.data, data_dir), cfg.format)
        return [a + b + " " + c for a, b, c in zip(p.prompt, p.chosen, p.rejected, strict=True)]

    def policy(self) -> LoRAPolicy:
        """The process's one policy (built on first use; see the module docstring)."""
        if self._policy is None:
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32).to(self.config.torch_device())
            base.generation_config.pad_token_id = self.tokenizer.eos_token_id
            self._policy = LoRAPolicy(base, self.tokenizer, self.config.lora, self.seed)
        return self._policy

    # ------------------------------------------------------------------ Task
    def client_ids(self) -> list[int]:
        return list(range(self.num_clients))

    def shared_spec(self) -> ParamSpec:
        return self._spec

    def initial_shared(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._initial.items()}

    def make_client(self, client_id: int) -> RLHFClient:
        if client_id not in self.client_ids():
            raise KeyError(f"no RLHF client {client_id}; clients are 0..{self.num_clients - 1}")
        return RLHFClient(self, client_id)

    def baselines(self) -> Mapping[str, Callable[[], dict[str, Any]]]:
        return {"initial_policy": self.initial_policy_baseline}

    def initial_policy_baseline(self, rounds: int | None = None, local_epochs: int | None = None) -> dict[str, Any]:
        """The base model (adapters at their initial value, B = 0) judged on the same held-out prompts
        with the same sampling seeds as every round's evaluation."""
        rows = [evaluate_policy(self, self.initial_shared(), k) for k in self.client_ids()]
        out = pool(rows)
        out["kl_to_base"] = 0.0
        out.update({f"judge_{k}": v for k, v in self.judge_calibration.items()})
        return out

    # ------------------------------------------------------------------ AuditableTask
    def _client_records(self, k: int):
        c = self.split.clients[k]
        return c.reviews if self.config.imdb else c.pairs

    def _record_text(self, rows) -> list[str]:
        if isinstance(rows, Reviews):
            return list(rows.text)
        return [p + c for p, c in zip(rows.prompt, rows.chosen, strict=True)]

    def _record_label(self, rows) -> np.ndarray:
        return rows.label.astype(np.int64) if isinstance(rows, Reviews) else np.zeros(len(rows), np.int64)

    def training_records(self) -> np.ndarray:
        """(N, 3) int64 ``(client_id, row_id, label)``, client by client; rows left out by
        :meth:`with_records` are still listed."""
        rows = [
            np.stack([np.full(len(r), k, dtype=np.int64), np.asarray(r.ids, np.int64), self._record_label(r)], axis=1)
            for k, r in enumerate(self._record_data)
        ]
        return np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 3), np.int64)

    def with_records(self, keep: np.ndarray) -> RLHFTask:
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != self._keep.shape:
            raise ValueError(f"keep has shape {keep.shape}, training_records() has {len(self._keep)} rows")
        return self._with_data(self._record_data, keep & self._keep)

    def _universe_rows(self, ids: np.ndarray):
        if self.config.imdb:
            return self.train_reviews.take(ids)
        return self.split.universe.take(ids)

    def _universe_size(self) -> int:
        return len(self.train_reviews) if self.config.imdb else len(self.split.universe)

    def record_scores(
        self, shared: Mapping[str, np.ndarray], records: np.ndarray, personal: Mapping[str, np.ndarray] | None = None
    ) -> np.ndarray:
        """The logit ``z`` of the released policy on each record, so that the record's loss is ``softplus(−z)``
        (the convention of :func:`attacks.loss.loss_scores`).

        * **Preference rows** (your own data): ``z = β·[log π/π_0(chosen | prompt) − log π/π_0(rejected | prompt)]``,
          the DPO implicit-reward margin of the row (Rafailov et al. 2023, eq. 7) against the base model
          π_0 (adapters off, public), β the run's ``trainer_args.beta`` (TRL's default 0.1). Then
          ``softplus(−z)`` is exactly the row's DPO loss, the objective its client trained on, so the
          LOSS attack is Yeom et al.'s attack on that objective. A likelihood score of prompt +
          chosen is not: DPO moves the *difference* of the two log-probabilities and may lower both
          (measured in docs/rlhf.md, Audits: AUC 0.50-0.54 on runs where this score gives 1.0).
        * **Reviews** (IMDb preset) and prompt-only rows: ``z = log(p / (1 − p))``, ``p`` the geometric
          mean of the policy's token probabilities on the text (at most :data:`RECORD_TOKENS` tokens
          after an end-of-text token)."""
        records = np.asarray(records, dtype=np.int64)
        if len(records) == 0:
            return np.zeros(0)
        ids = records[:, 1]
        if ids.min() < 0 or ids.max() >= self._universe_size():
            raise ValueError(f"record ids must be in 0..{self._universe_size() - 1}")
        rows = self._universe_rows(ids)
        policy = self.policy()
        policy.load_shared(shared)
        if isinstance(rows, Pairs) and rows.has_pairs:
            return self.dpo_beta * preference_margins(policy, rows)
        return self.text_scores(policy, self._record_text(rows))

    @property
    def dpo_beta(self) -> float:
        """The β of the run's DPO (``trainer_args.beta``, else the default :func:`.trainers.run_dpo` passes TRL)."""
        from .trainers import DPO_DEFAULTS

        return float(self.config.trainer_args.get("beta", DPO_DEFAULTS["beta"]))

    def text_scores(self, policy: LoRAPolicy, texts: list[str]) -> np.ndarray:
        """``log(p / (1 − p))``, ``p`` the geometric mean of the token probabilities of each text (see :meth:`record_scores`)."""
        eos = self.tokenizer.eos_token_id
        tokens = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=RECORD_TOKENS)["input_ids"]
        tokens = [t if t else [eos] for t in tokens]
        mean_lp = np.empty(len(tokens))
        for s in range(0, len(tokens), 32):
            chunk = tokens[s : s + 32]
            lps = policy.completion_logprobs(policy.model, [[eos]] * len(chunk), chunk)
            mean_lp[s : s + len(chunk)] = [float(lp.mean()) for lp in lps]
        mean_lp = np.minimum(mean_lp, -1e-12)
        return mean_lp - np.log(-np.expm1(mean_lp))

    def _unused_ids(self) -> np.ndarray:
        used = np.zeros(self._universe_size(), dtype=bool)
        for r in self._record_data:
            used[np.asarray(r.ids, np.int64)] = True
        if self.config.imdb:
            used[self.split.extras["public_ids"]] = True
        # With your own data every row is dealt to a client, so the rows no part of the run trains on
        # are the held-out evaluation rows: same distribution as the members, never in a gradient
        # (only scored), hence valid non-members and canaries.
        return np.flatnonzero(~used)

    def _concat(self, parts):
        return Reviews.concat(parts) if self.config.imdb else Pairs.concat(parts)

    def membership_candidates(self) -> Candidates:
        """Members: the clients' rows. Non-members: as many rows no part of the run uses, dealt to the clients at random."""
        unused = self._unused_ids()
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0xA0D1]))
        chosen = rng.permutation(unused)[: min(len(unused), len(self._keep))]
        parts = np.array_split(chosen, self.num_clients)
        data, member = [], []
        for k, own in enumerate(self._record_data):
            extra = self._universe_rows(np.sort(parts[k]))
            data.append(self._concat([own, extra]))
            member.append(np.r_[np.ones(len(own), bool), np.zeros(len(extra), bool)])
        return Candidates(self._with_data(data, None), np.concatenate(member))

    def with_canaries(self, num_canaries: int, rng: np.random.Generator) -> CanarySet:
        unused = self._unused_ids()
        if num_canaries > len(unused):
            raise InputError(f"--canaries {num_canaries}: canaries are rows no client holds; this split leaves only {len(unused)}")
        ids = np.sort(rng.choice(unused, size=num_canaries, replace=False))
        owner = rng.integers(0, self.num_clients, size=num_canaries)
        data, index, pos = [], [], 0
        for k, own in enumerate(self._record_data):
            mine = ids[owner == k]
            data.append(self._concat([own, self._universe_rows(mine)]))
            index.append(np.arange(pos + len(own), pos + len(own) + len(mine)))
            pos += len(data[-1])
        task = self._with_data(data, None)
        index = np.concatenate(index).astype(np.int64)
        return CanarySet(task, task.training_records()[index], index)

    def canary_scores(self, released: Mapping[str, np.ndarray], canaries: np.ndarray) -> np.ndarray:
        return self.record_scores(released, canaries) - self.record_scores(self.initial_shared(), canaries)

    def record_clients(self, records: np.ndarray) -> np.ndarray:
        cid = np.asarray(records, dtype=np.int64)[:, 0]
        return np.where((cid >= 0) & (cid < self.num_clients), cid, -1)

    def with_num_clients(self, num_clients: int) -> RLHFTask:
        if num_clients == self.num_clients:
            return self
        if self.config.partition == "user":
            raise InputError("task.partition: user fixes one client per annotator; the number of clients cannot change")
        return RLHFTask(replace(self.config, clients=num_clients), self.data_dir, self.seed)

    def _with_data(self, data: list, keep: np.ndarray | None) -> RLHFTask:
        task = copy.copy(self)
        task._record_data = list(data)
        task._keep = np.ones(sum(len(r) for r in data), dtype=bool) if keep is None else keep
        clients, pos = [], 0
        for k, r in enumerate(data):
            kept = r.take(np.flatnonzero(task._keep[pos : pos + len(r)]))
            pos += len(r)
            c = self.split.clients[k]
            clients.append(replace(c, reviews=kept) if self.config.imdb else replace(c, pairs=kept, prompts=list(kept.prompt)))
        task.split = replace(self.split, clients=clients)
        return task

    def eval_seed(self, client_id: int) -> int:
        """The same sampling seed every round (common random numbers: rounds differ only by the policy)."""
        return int(np.random.SeedSequence([self.seed, client_id, 0xE7A1]).generate_state(1)[0] & 0x7FFFFFFF)


# ---------------------------------------------------------------------- evaluation


def calibrate_judge(judge: EvaluationClassifier, reviews: Reviews, tokenizer, cfg: RLHFConfig) -> tuple[float, dict[str, float]]:
    """The judge's decision threshold for texts as long as the generations it scores.

    The judge is trained on full reviews; on short text its probabilities crowd just above 0.5.
    Measured (docs/rlhf.md): on the real 16-token continuations of 599 held-out test reviews, 49.7%
    of them positive, P > 0.5 calls 69% positive (65% accurate), so a neutral policy would already
    score about 0.7 and a "positive rate" would mostly measure that bias. With ``judge_calibration:
    length`` the threshold is instead the quantile of P on those real continuations (the reviews
    whose openings are the held-out prompts, cut after ``max_new_tokens`` tokens) that makes the
    judge's positive rate on them equal to their true positive rate; the same threshold scores the
    base model and every round. ``fixed`` keeps 0.5."""
    cuts = token_prefix(list(reviews.text), tokenizer, cfg.prompt_tokens)
    texts, labels = [], []
    for (p, c), y in zip(cuts, reviews.label, strict=True):
        if p and c.strip():
            ids = tokenizer(c, add_special_tokens=False)["input_ids"][: cfg.max_new_tokens]
            texts.append(tokenizer.decode(ids))
            labels.append(int(y))
    if not texts:
        return 0.5, {}
    prob = judge.prob_positive(texts)
    y = np.asarray(labels)
    threshold = float(np.quantile(prob, 1.0 - y.mean())) if cfg.judge_calibration == "length" else 0.5
    info = {
        "continuations": float(len(y)),
        "true_positive_rate": float(y.mean()),
        "rate_at_0.5": float((prob > 0.5).mean()),
        "accuracy_at_0.5": float(((prob > 0.5) == y).mean()),
        "threshold": threshold,
        "rate_at_threshold": float((prob > threshold).mean()),
        "accuracy_at_threshold": float(((prob > threshold) == y).mean()),
    }
    return threshold, info


def evaluate_policy(task: RLHFTask, shared: Mapping[str, np.ndarray], client_id: int, reward: ShapedReward | None = None) -> dict[str, Any]:
    """Held-out generations of the policy with ``shared``: judge, lexicon, KL to the base model, samples."""
    cfg = task.config
    policy = task.policy()
    policy.load_shared(shared)
    prompts = task.split.eval_prompts[client_id]
    prompt_ids = policy.encode_prompts(prompts)
    completion_ids = policy.generate(
        prompt_ids, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=task.eval_seed(client_id)
    )
    completions = policy.decode(completion_ids)
    kl = policy.kl_to_reference(prompt_ids, completion_ids)
    lex = lexicon_scores(completions)
    out: dict[str, Any] = {
        "generations": len(completions),
        "kl_to_base": float(kl.mean()),
        "lexicon_score": float(lex.mean()),
        "lexicon_positive": int((lex > 0).sum()),
        "lexicon_positive_rate": float((lex > 0).mean()),
        "completion_tokens": float(np.mean([len(c) for c in completion_ids])),
    }
    if task.judge is not None:
        judge = task.judge.prob_positive(completions)
        hit = judge > task.judge_threshold
        out.update({"positive": int(hit.sum()), "positive_rate": float(hit.mean()), "judge_score": float(judge.mean())})
    if reward is not None:
        parts = reward.components(completions, completion_ids)
        shaped = float(parts["shaped"].mean())
        out.update(
            {"shaped_reward": shaped, f"shaped_reward_client{client_id}": shaped, "reward_sentiment": float(parts["sentiment"].mean())}
        )
    pairs = task.split.eval_pairs[client_id]
    if len(pairs) and pairs.has_pairs:
        out.update(preference_accuracy(policy, pairs))
    k = cfg.samples_per_client
    out["samples"] = [f"{p}▸{c}" for p, c in zip(prompts[:k], completions[:k], strict=False)]
    return out


def preference_margins(policy: LoRAPolicy, pairs: Pairs, chunk: int = 32) -> np.ndarray:
    """DPO's implicit reward margin per pair (Rafailov et al. 2023, eq. 7, without β):
    ``[log π(chosen|prompt) − log π_0(chosen|prompt)] − [log π(rejected|prompt) − log π_0(rejected|prompt)]``,
    sequence log-probabilities summed over the completion's tokens, π_0 the base model (adapters off)."""
    enc = policy.tokenizer
    out = np.empty(len(pairs))
    for s in range(0, len(pairs), chunk):
        part = pairs.take(np.arange(s, min(s + chunk, len(pairs))))
        p_ids = policy.encode_prompts(part.prompt)
        margin = []
        for texts in (part.chosen, part.rejected):
            ids = [r or [enc.eos_token_id] for r in enc(list(texts), add_special_tokens=False)["input_ids"]]
            mine = policy.completion_logprobs(policy.model, p_ids, ids)
            with policy.reference() as ref:
                base = policy.completion_logprobs(ref, p_ids, ids)
            margin.append(np.asarray([float((a - b).sum()) for a, b in zip(mine, base, strict=True)]))
        out[s : s + len(part)] = margin[0] - margin[1]
    return out


def preference_accuracy(policy: LoRAPolicy, pairs: Pairs) -> dict[str, float]:
    """DPO's implicit reward on held-out pairs: the share where log π/π_0 of chosen exceeds rejected's."""
    diff = preference_margins(policy, pairs)
    return {
        "pref_correct": int((diff > 0).sum()),
        "pref_pairs": len(diff),
        "pref_accuracy": float((diff > 0).mean()),
        "pref_margin": float(diff.mean()),
    }


def pool(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Pooled rates from per-client counts, means of the rest (what the baseline reports)."""
    out: dict[str, Any] = {}
    n = sum(r["generations"] for r in rows)
    if all("positive" in r for r in rows):
        out["positive_rate"] = sum(r["positive"] for r in rows) / n
        out["judge_score"] = float(np.mean([r["judge_score"] for r in rows]))
    out["lexicon_positive_rate"] = sum(r["lexicon_positive"] for r in rows) / n
    out["generations"] = n
    if all("pref_pairs" in r for r in rows):
        out["pref_accuracy"] = sum(r["pref_correct"] for r in rows) / max(1, sum(r["pref_pairs"] for r in rows))
    return out


# ---------------------------------------------------------------------- clients


class RLHFClient(TaskClient):
    """Client k: its prompts and pairs, (IMDb) its reward classifier and simulated human."""

    def __init__(self, task: RLHFTask, client_id: int) -> None:
        cfg = task.config
        self.task = task
        self.client_id = client_id
        self.lam = cfg.lambda_for(client_id)
        self.preference = cfg.preference_for(client_id)
        self.noise = cfg.noise_for(client_id)
        self.classifier: SentimentClassifier | None = None
        self.reward: ShapedReward | None = None
        if cfg.imdb:
            torch.manual_seed(task.seed * 1000 + client_id)
            self.classifier = SentimentClassifier()
            policy = task.policy()
            self.reward = ShapedReward(
                self.classifier, self.lam, self.preference, cfg.length_target, tuple(cfg.topic_words), policy.reference_logprobs
            )
        self.reward_model = None  # trained on first use (trainer: grpo, reward: model)

    @property
    def data(self):
        return self.task.split.clients[self.client_id]

    def num_examples(self) -> int:
        d = self.data
        return len(d.reviews) if d.reviews is not None else max(1, len(d.pairs) if d.pairs.has_pairs else len(d.prompts))

    def _train_sentiment(self, config: FitConfig) -> int:
        cfg = self.task.config
        reviews = self.data.reviews
        ids, mask = encode(reviews.text, REVIEW_WORDS)
        labels = torch.as_tensor(reviews.label, dtype=torch.long)
        common = {"epochs": config.local_epochs, "lr": cfg.reward_lr, "seed": config.seed, "window": cfg.reward_window}
        if config.dp_sgd is None:
            return train_classifier(self.classifier, ids, mask, labels, batch=cfg.reward_batch, **common)
        return train_classifier_dp(self.classifier, ids, mask, labels, dp=config.dp_sgd, **common)

    def fit(self, shared: Mapping[str, np.ndarray], config: FitConfig) -> FitResult:
        from . import trainers

        cfg = self.task.config
        t0 = time.perf_counter()
        policy = self.task.policy()
        policy.load_shared(shared)
        metrics: dict[str, float] = {}
        reward_steps = 0
        if self.classifier is not None:
            reward_steps = self._train_sentiment(config)
            metrics["reward_steps"] = float(reward_steps)
        elif config.dp_sgd is not None:
            raise InputError(
                "record-level DP (privacy.mode: record) covers the IMDb clients' reward training; with your own data use client-level DP"
            )
        if cfg.trainer == "dpo" and cfg.on_policy:
            metrics.update(trainers.on_policy_dpo(self, config))
        elif cfg.trainer == "dpo":
            metrics.update(trainers.offline_dpo(self, config))
        else:
            metrics.update(trainers.grpo(self, config))
        new = policy.shared_state()
        delta = {k: (new[k] - np.asarray(shared[k], dtype=np.float32)).astype(np.float32) for k in new}
        metrics["seconds_fit"] = time.perf_counter() - t0
        privacy = None if config.dp_sgd is None else DPSGDReport.of(config.dp_sgd, reward_steps)
        return FitResult(delta, self.num_examples(), metrics=metrics, dp_sgd=privacy)

    def evaluate(self, shared: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Held-out generations by the policy with ``shared`` (see :func:`evaluate_policy`), with this client's own shaped reward."""
        return evaluate_policy(self.task, shared, self.client_id, self.reward)

    def personal_state(self) -> dict[str, np.ndarray]:
        if self.classifier is None:
            return {}
        return {f"reward/{k}": v.detach().numpy().copy() for k, v in self.classifier.state_dict().items()}

    def load_personal_state(self, state: Mapping[str, np.ndarray]) -> None:
        if self.classifier is None:
            super().load_personal_state(state)
            return
        own = self.classifier.state_dict()
        missing = sorted(f"reward/{k}" for k in own if f"reward/{k}" not in state)
        if missing:
            raise KeyError(f"RLHF client {self.client_id}: personal state lacks {missing}")
        self.classifier.load_state_dict({k: torch.from_numpy(np.asarray(state[f"reward/{k}"])) for k in own})


def make_task(config: RLHFConfig, data_dir: Path | None, seed: int) -> RLHFTask:
    return RLHFTask(config, data_dir, seed)
