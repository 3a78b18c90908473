"""FedRLHF on IMDb: the :class:`~fedrlhf_secure.tasks.base.Task` the engine drives.

One local step of client k (FedRLHF Algorithm 1, lines 4-9, for the IMDb experiment of §5.2):

1. load the global shared parameters (LoRA adapters by default) into the live policy;
2. train its reward classifier a further ``local_epochs`` epochs on its own labelled reviews
   (DP-SGD when the privacy plan asks for record-level DP);
3. run ``rl_steps`` steps of TRL's ``GRPOTrainer`` on prompts from the public pool with the shaped
   reward ``R_k = λ_k·R_sentiment,k + (1−λ_k)·H_k`` as its reward function;
4. return the delta of the shared parameters.

**Why one GRPOTrainer per client, kept for the whole run.** Building a trainer (accelerate state,
dataset preparation, generation config, the frozen "ref" adapter) costs far more than a few CPU RL
steps, so each client builds its trainer once, around its own policy, and every round only
rewrites the adapter tensors in place (:meth:`Policy.load_shared`), resets the optimizer (a fresh
Adam each round, as in FedAvg) and sets ``max_steps`` and the round's seed. TRL 1.16 has no
PPOTrainer; GRPO needs no value head, which is also the only trained part a PPO client would have
had to keep personal.

With ``rl_beta > 0`` TRL's KL penalty is to a frozen copy of the *initial* adapters (B = 0, i.e.
exactly π_0), made when the trainer is built, before any round.

Everything a client returns from :meth:`IMDbClient.evaluate` is numeric except ``samples``, a few
generations the engine keeps on the client's side (they never enter a ``fed/report`` frame).
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
import warnings
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
from .config import IMDbConfig
from .data import IMDbSplit, Reviews, load_reviews, prompts_from, split_reviews
from .evaluation import EvaluationClassifier
from .policy import Policy
from .reward import SentimentClassifier, ShapedReward, encode, train_classifier, train_classifier_dp

REVIEW_WORDS = 128
"""Reward classifiers read the first 128 words of a review (sentiment shows early; keeps DP-SGD cheap)."""

RECORD_TOKENS = 64
"""Audits score a review by the released policy's likelihood of its first 64 tokens (at most the context)."""

logger = logging.getLogger(__name__)


class IMDbTask(Task, AuditableTask):
    """Clients ``0..clients-1``, each with a shard of labelled reviews (its reward's training data).

    For the membership audits (:class:`~fedrlhf_secure.tasks.auditable.AuditableTask`) a record is
    one labelled review a client holds, ``(client_id, review_id, label)`` with ``review_id`` its
    position in the training split; the released model is the policy's shared parameters, which
    see a client's reviews only through the reward it trains on them.
    """

    name = "imdb"
    metrics = (
        Metric("positive_rate_mean", "positive rate (judge)", "fraction of generations"),
        Metric("sentiment_score_mean", "sentiment score", "judge P(positive)"),
        Metric("shaped_reward_mean", "shaped reward", "reward (R0 + λ·H)"),
        Metric("kl_to_initial_mean", "KL to initial policy", "nats per completion"),
    )

    def __init__(self, config: IMDbConfig, data_dir: Path | None, seed: int, *, progress: bool = True) -> None:
        torch.set_num_threads(config.torch_threads)
        self.config = config
        self.seed = seed
        self.data_dir = data_dir
        train, test = load_reviews(config.dataset, data_dir)
        self.split: IMDbSplit = split_reviews(train, test, config, seed)
        self.train_reviews = train
        """Every training review; ``review_id`` indexes it (audit records, non-members, canaries)."""
        self._record_shards: list[Reviews] = list(self.split.shards)
        """The clients' shards as listed by :meth:`training_records`; ``split.shards`` is what they train on."""
        self._keep = np.ones(sum(len(r) for r in self._record_shards), dtype=bool)
        self._scorer: Policy | None = None
        self.tokenizer = self._tokenizer(data_dir)
        self.model_path, self.pretrain_report = self._policy_weights(progress)
        check = self.split.eval_prompts
        self.evaluator = EvaluationClassifier.train(
            self.split.eval_classifier.text, self.split.eval_classifier.label, check.text, check.label, seed
        )
        public_prompts = prompts_from(self.split.public.text, self.tokenizer, config.prompt_tokens)
        self.train_prompts = [public_prompts[k :: config.clients] for k in range(config.clients)]
        eval_prompts = prompts_from(self.split.eval_prompts.text, self.tokenizer, config.prompt_tokens)
        self.eval_prompts = [eval_prompts[k * config.eval_prompts : (k + 1) * config.eval_prompts] for k in range(config.clients)]
        template = self.new_policy()
        self._initial = template.shared_state()
        self._spec = ParamSpec(tuple(ParamEntry(n, tuple(v.shape)) for n, v in self._initial.items()))

    # ------------------------------------------------------------------ construction helpers
    def _tokenizer(self, data_dir: Path | None):
        from .tokenizer import gpt2_tokenizer, model_tokenizer, trained_tokenizer

        if self.config.model != "small":
            return model_tokenizer(self.config.model)
        if self.config.tokenizer == "gpt2":
            return gpt2_tokenizer(data_dir)
        return trained_tokenizer(self.split.public.text, self.config.vocab_size)

    def _policy_weights(self, progress: bool) -> tuple[str, dict[str, Any]]:
        if self.config.model != "small":
            return self.config.model, {}
        from .pretrain import pretrained_small_gpt2

        path, report = pretrained_small_gpt2(
            self.config.policy,
            self.tokenizer,
            self.split.public.text,
            self.split.eval_classifier.text[:500],
            self.seed,
            progress,
            self.config.torch_device(),
        )
        return str(path), report

    def new_policy(self) -> Policy:
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32).to(self.config.torch_device())
        base.generation_config.pad_token_id = self.tokenizer.eos_token_id
        return Policy(
            base,
            self.tokenizer,
            share=self.config.share,
            lora_rank=self.config.lora_rank,
            lora_alpha=self.config.lora_alpha,
            seed=self.seed,
        )

    # ------------------------------------------------------------------ Task interface
    def client_ids(self) -> list[int]:
        return list(range(self.config.clients))

    def shared_spec(self) -> ParamSpec:
        return self._spec

    def initial_shared(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._initial.items()}

    def make_client(self, client_id: int) -> IMDbClient:
        if client_id not in self.client_ids():
            raise KeyError(f"no IMDb client {client_id}; clients are 0..{self.config.clients - 1}")
        return IMDbClient(self, client_id)

    def baselines(self) -> Mapping[str, Callable[[], dict[str, Any]]]:
        return {"initial_policy": self.initial_policy_baseline}

    def initial_policy_baseline(self, rounds: int | None = None, local_epochs: int | None = None) -> dict[str, Any]:
        """The pretrained policy before any RL, judged on the same held-out prompts with the same seeds.

        The federation's schedule (``rounds``, ``local_epochs``) does not apply: this policy is not trained."""
        policy = self.new_policy()
        positive = n = 0
        scores = []
        for cid in self.client_ids():
            gen = sample_and_judge(self, policy, cid)
            positive += int(gen["judge"].__gt__(0.5).sum())
            n += len(gen["judge"])
            scores.append(gen["judge"])
        return {
            "positive_rate": positive / n,
            "sentiment_score": float(np.concatenate(scores).mean()),
            "generations": n,
            "kl_to_initial": 0.0,
            **{f"pretrain_{k}": v for k, v in self.pretrain_report.items()},
        }

    # ------------------------------------------------------------------ AuditableTask (attacks/)
    def training_records(self) -> np.ndarray:
        """(N, 3) int64 ``(client_id, review_id, label)`` of every review in the clients' shards,
        client by client in shard order. Reviews left out by :meth:`with_records` are still listed."""
        rows = [
            np.stack([np.full(len(r), k, dtype=np.int64), r.ids, r.label.astype(np.int64)], axis=1)
            for k, r in enumerate(self._record_shards)
        ]
        return np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 3), dtype=np.int64)

    def with_records(self, keep: np.ndarray) -> IMDbTask:
        """The same task (tokenizer, policy, prompts, judge, seeds) whose client k trains its reward
        only on its reviews in ``training_records()[keep]``."""
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != self._keep.shape:
            raise ValueError(f"keep has shape {keep.shape}, training_records() has {len(self._keep)} rows")
        return self._with_shards(self._record_shards, keep & self._keep)

    def record_scores(
        self, shared: Mapping[str, np.ndarray], records: np.ndarray, personal: Mapping[str, np.ndarray] | None = None
    ) -> np.ndarray:
        """``z = log(p / (1 - p))`` with ``p`` the geometric mean of the released policy's token
        probabilities on the review's first tokens (at most :data:`RECORD_TOKENS`), after an
        end-of-text token: ``log p`` is the language-model loss of the review, negated.

        ``personal`` (a client's reward classifier) is not used: the released model is the policy."""
        records = np.asarray(records, dtype=np.int64)
        if len(records) == 0:
            return np.zeros(0, dtype=np.float64)
        ids = records[:, 1]
        if ids.min() < 0 or ids.max() >= len(self.train_reviews):
            raise ValueError(f"review ids must be in 0..{len(self.train_reviews) - 1}")
        policy = self._scoring_policy()
        policy.load_shared(shared)
        model = policy.model
        config = getattr(model, "get_base_model", lambda: model)().config
        width = max(1, min(RECORD_TOKENS, int(getattr(config, "n_positions", RECORD_TOKENS + 1)) - 1))
        eos = self.tokenizer.eos_token_id
        texts = [self.train_reviews.text[i] for i in ids]
        tokens = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=width)["input_ids"]
        tokens = [t if t else [eos] for t in tokens]
        mean_lp = np.empty(len(tokens), dtype=np.float64)
        for s in range(0, len(tokens), 64):
            chunk = tokens[s : s + 64]
            lps = policy.completion_logprobs(model, [[eos]] * len(chunk), chunk)
            mean_lp[s : s + len(chunk)] = [float(lp.mean()) for lp in lps]
        mean_lp = np.minimum(mean_lp, -1e-12)
        return mean_lp - np.log(-np.expm1(mean_lp))

    def membership_candidates(self) -> Candidates:
        """Members: the clients' reviews. Non-members: as many training reviews that no client holds
        and the public pool does not contain (never seen by any part of the run), dealt to the
        clients as the split deals reviews (at random, or by star-rating band for ``by_rating``);
        each client lists its members first, then its non-members."""
        unused = self._unused_review_ids()
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0xA0D1]))
        n = min(len(unused), len(self._keep))
        chosen = rng.permutation(unused)[:n]
        if self.config.partition == "by_rating":
            chosen = chosen[np.argsort(self.train_reviews.rating[chosen], kind="stable")]
        parts = np.array_split(chosen, self.config.clients)
        shards, member = [], []
        for k, own in enumerate(self._record_shards):
            extra = self.train_reviews.take(np.sort(parts[k]))
            shards.append(Reviews.concat([own, extra]))
            member.append(np.r_[np.ones(len(own), dtype=bool), np.zeros(len(extra), dtype=bool)])
        task = self._with_shards(shards, None)
        return Candidates(task, np.concatenate(member))

    def with_canaries(self, num_canaries: int, rng: np.random.Generator) -> CanarySet:
        """``num_canaries`` training reviews that no client holds and the public pool does not
        contain, each added to a random client's shard (appended after its own reviews)."""
        unused = self._unused_review_ids()
        if num_canaries > len(unused):
            raise InputError(
                f"--canaries {num_canaries}: IMDb canaries are training reviews no client or the public pool "
                f"holds; this split leaves only {len(unused)}"
            )
        ids = np.sort(rng.choice(unused, size=num_canaries, replace=False))
        owner = rng.integers(0, self.config.clients, size=num_canaries)
        shards, index, pos = [], [], 0
        for k, own in enumerate(self._record_shards):
            mine = ids[owner == k]
            shards.append(Reviews.concat([own, self.train_reviews.take(mine)]))
            index.append(np.arange(pos + len(own), pos + len(own) + len(mine)))
            pos += len(shards[-1])
        task = self._with_shards(shards, None)
        index = np.concatenate(index).astype(np.int64)
        return CanarySet(task, task.training_records()[index], index)

    def canary_scores(self, released: Mapping[str, np.ndarray], canaries: np.ndarray) -> np.ndarray:
        """How much the released policy's confidence on each canary review rose over the public
        initial policy's (:meth:`record_scores` difference)."""
        return (self.record_scores(released, canaries) - self.record_scores(self.initial_shared(), canaries)).astype(np.float64)

    def record_clients(self, records: np.ndarray) -> np.ndarray:
        """The ``client_id`` column (-1 where it names no client of this task)."""
        cid = np.asarray(records, dtype=np.int64)[:, 0]
        return np.where((cid >= 0) & (cid < self.config.clients), cid, -1)

    def with_num_clients(self, num_clients: int) -> IMDbTask:
        """A new IMDb task with ``clients = num_clients`` (a fresh split: shards, public pool and
        prompts all depend on the number of clients; the pretrained policy comes from the cache
        when the public pool is unchanged)."""
        if num_clients == self.config.clients:
            return self
        logger.info("building the IMDb task anew with %d clients (was %d)", num_clients, self.config.clients)
        return IMDbTask(replace(self.config, clients=num_clients), self.data_dir, self.seed, progress=False)

    def _with_shards(self, shards: list[Reviews], keep: np.ndarray | None) -> IMDbTask:
        """A copy sharing every built part (tokenizer, policy weights, judge, prompts) over other shards."""
        task = copy.copy(self)
        task._record_shards = list(shards)
        total = sum(len(r) for r in shards)
        task._keep = np.ones(total, dtype=bool) if keep is None else keep
        kept, pos = [], 0
        for r in shards:
            kept.append(r.take(np.flatnonzero(task._keep[pos : pos + len(r)])))
            pos += len(r)
        task.split = replace(self.split, shards=kept)
        return task

    def _unused_review_ids(self) -> np.ndarray:
        used = np.zeros(len(self.train_reviews), dtype=bool)
        for r in self._record_shards:
            used[r.ids] = True
        used[self.split.public.ids] = True
        return np.flatnonzero(~used)

    def _scoring_policy(self) -> Policy:
        if self._scorer is None:
            self._scorer = self.new_policy()
        return self._scorer

    def eval_seed(self, client_id: int) -> int:
        """The same sampling seed in every round, so rounds differ only by the policy (common random numbers)."""
        return int(np.random.SeedSequence([self.seed, client_id, 0xE7A1]).generate_state(1)[0] & 0x7FFFFFFF)


def sample_and_judge(task: IMDbTask, policy: Policy, client_id: int) -> dict[str, Any]:
    cfg = task.config
    prompts = task.eval_prompts[client_id]
    prompt_ids = policy.encode_prompts(prompts)
    completion_ids = policy.generate(
        prompt_ids, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=task.eval_seed(client_id)
    )
    completions = policy.decode(completion_ids)
    return {
        "prompts": prompts,
        "prompt_ids": prompt_ids,
        "completion_ids": completion_ids,
        "completions": completions,
        "judge": task.evaluator.prob_positive(completions),
    }


class IMDbClient(TaskClient):
    """Client k: its labelled reviews, its reward classifier (personal), its policy copy and GRPO trainer."""

    def __init__(self, task: IMDbTask, client_id: int) -> None:
        cfg = task.config
        self.task = task
        self.client_id = client_id
        self.lam = cfg.lambda_for(client_id)
        self.preference = cfg.preference_for(client_id)
        shard = task.split.shards[client_id]
        self.review_ids, self.review_mask = encode(shard.text, REVIEW_WORDS)
        self.review_labels = torch.as_tensor(shard.label, dtype=torch.long)
        torch.manual_seed(task.seed * 1000 + client_id)
        self.classifier = SentimentClassifier()
        self.policy = task.new_policy()
        self.reward = ShapedReward(
            self.classifier, self.lam, self.preference, cfg.length_target, tuple(cfg.topic_words), self.policy.reference_logprobs
        )
        self._workdir = tempfile.TemporaryDirectory(prefix=f"fedrlhf-imdb-{client_id}-")
        self.trainer = self._build_trainer()

    def _build_trainer(self):
        from datasets import Dataset
        from transformers import PrinterCallback
        from trl import GRPOConfig, GRPOTrainer

        cfg = self.task.config
        args = GRPOConfig(
            output_dir=self._workdir.name,
            use_cpu=cfg.torch_device() == "cpu",
            report_to=[],
            save_strategy="no",
            logging_strategy="steps",
            logging_steps=1,
            disable_tqdm=True,
            max_steps=cfg.rl_steps,
            learning_rate=cfg.rl_lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            per_device_train_batch_size=cfg.prompts_per_step * cfg.num_generations,
            gradient_accumulation_steps=1,
            num_generations=cfg.num_generations,
            max_completion_length=cfg.max_new_tokens,
            temperature=cfg.temperature,
            beta=cfg.rl_beta,
            disable_dropout=True,
            seed=self.task.seed,
            dataloader_num_workers=0,
            bf16=False,
            fp16=False,
            log_completions=False,
        )
        dataset = Dataset.from_dict({"prompt": self.task.train_prompts[self.client_id]})
        with warnings.catch_warnings(), _quiet_transformers():
            warnings.simplefilter("ignore")
            trainer = GRPOTrainer(
                model=self.policy.model, reward_funcs=[self.reward], args=args, train_dataset=dataset, processing_class=self.task.tokenizer
            )
        trainer.remove_callback(PrinterCallback)  # per-step logs stay in trainer.state.log_history
        return trainer

    def num_examples(self) -> int:
        return len(self.review_labels)

    # ------------------------------------------------------------------ local RLHF
    def _train_reward(self, config: FitConfig) -> int:
        cfg = self.task.config
        if config.dp_sgd is None:
            return train_classifier(
                self.classifier,
                self.review_ids,
                self.review_mask,
                self.review_labels,
                epochs=config.local_epochs,
                lr=cfg.reward_lr,
                batch=cfg.reward_batch,
                seed=config.seed,
                window=cfg.reward_window,
            )
        return train_classifier_dp(
            self.classifier,
            self.review_ids,
            self.review_mask,
            self.review_labels,
            epochs=config.local_epochs,
            lr=cfg.reward_lr,
            dp=config.dp_sgd,
            seed=config.seed,
            window=cfg.reward_window,
        )

    def fit(self, shared: Mapping[str, np.ndarray], config: FitConfig) -> FitResult:
        t0 = time.perf_counter()
        self.policy.load_shared(shared)
        reward_steps = self._train_reward(config)
        t_reward = time.perf_counter() - t0
        trainer = self.trainer
        trainer.args.seed = config.seed  # a fresh prompt order and sampling stream every round
        trainer.args.max_steps = self.task.config.rl_steps
        trainer.optimizer, trainer.lr_scheduler = None, None
        t1 = time.perf_counter()
        with warnings.catch_warnings(), _quiet_transformers():
            warnings.simplefilter("ignore")
            out = trainer.train()
        t_rl = time.perf_counter() - t1
        logs = [h for h in trainer.state.log_history if "reward" in h]
        new = self.policy.shared_state()
        delta = {k: (new[k] - np.asarray(shared[k], dtype=np.float32)).astype(np.float32) for k in new}
        metrics = {
            "loss": float(out.training_loss),
            "rl_reward": float(np.mean([h["reward"] for h in logs])) if logs else float("nan"),
            "reward_steps": float(reward_steps),
            "rl_steps": float(trainer.state.global_step),
            "seconds_reward": t_reward,
            "seconds_rl": t_rl,
        }
        privacy = None if config.dp_sgd is None else DPSGDReport.of(config.dp_sgd, reward_steps)
        return FitResult(delta, self.num_examples(), metrics=metrics, dp_sgd=privacy)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, shared: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Held-out generations judged by the evaluation classifier, this client's shaped reward, KL to π_0.

        Counts (``positive``, ``generations``) come with the rates so the engine can pool them.
        """
        self.policy.load_shared(shared)
        gen = sample_and_judge(self.task, self.policy, self.client_id)
        judge = gen["judge"]
        parts = self.reward.components(gen["completions"], gen["completion_ids"])
        kl = self.policy.kl_to_reference(gen["prompt_ids"], gen["completion_ids"])
        shaped = float(parts["shaped"].mean())
        k = self.task.config.samples_per_client
        return {
            "positive": int((judge > 0.5).sum()),
            "generations": len(judge),
            "positive_rate": float((judge > 0.5).mean()),
            "sentiment_score": float(judge.mean()),
            "shaped_reward": shaped,
            f"shaped_reward_client{self.client_id}": shaped,
            "reward_sentiment": float(parts["sentiment"].mean()),
            "reward_preference": float(parts["preference"].mean()),
            "kl_to_initial": float(kl.mean()),
            "completion_tokens": float(np.mean([len(c) for c in gen["completion_ids"]])),
            "samples": [f"{p}▸{c}" for p, c in zip(gen["prompts"][:k], gen["completions"][:k], strict=True)],
        }

    # ------------------------------------------------------------------ personal state
    def personal_state(self) -> dict[str, np.ndarray]:
        return {f"reward/{k}": v.detach().numpy().copy() for k, v in self.classifier.state_dict().items()}

    def load_personal_state(self, state: Mapping[str, np.ndarray]) -> None:
        own = self.classifier.state_dict()
        missing = sorted(f"reward/{k}" for k in own if f"reward/{k}" not in state)
        if missing:
            raise KeyError(f"IMDb client {self.client_id}: personal state lacks {missing}")
        self.classifier.load_state_dict({k: torch.from_numpy(np.asarray(state[f"reward/{k}"])) for k in own})


class _quiet_transformers:
    """TRL/transformers log configuration chatter at INFO/WARNING on every train(); keep the progress bar readable."""

    def __enter__(self):
        self._levels = {}
        for name in ("transformers", "trl", "accelerate"):
            lg = logging.getLogger(name)
            self._levels[name] = lg.level
            lg.setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc):
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        return False


def make_task(config: IMDbConfig, data_dir: Path | None, seed: int) -> IMDbTask:
    return IMDbTask(config, data_dir, seed)
