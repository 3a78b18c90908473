"""The ``task:`` section for ``kind: imdb`` (validated by :func:`fedrlhf_secure.configtypes.from_mapping`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PREFERENCES = ("length", "topic", "fluency")


@dataclass(frozen=True)
class PolicyModelConfig:
    """The offline default policy: a small GPT-2 built from a ``GPT2Config`` and pretrained here.

    ``pretrain_steps`` optimizer steps of ``pretrain_batch`` blocks of ``block_size`` tokens on the
    public pool of IMDb training reviews (see :mod:`.data`). The result is cached under
    ``$FEDRLHF_CACHE_DIR`` (default ``~/.cache/fedrlhf``) keyed by a hash of these fields, the
    tokenizer and the data, so only the first run pays for it.
    """

    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    pretrain_steps: int = 400
    pretrain_batch: int = 8
    pretrain_lr: float = 3e-3

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "block_size", "pretrain_steps", "pretrain_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"task.policy.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"task.policy.n_embd ({self.n_embd}) must be a multiple of task.policy.n_head ({self.n_head})")
        if not self.pretrain_lr > 0:
            raise ValueError(f"task.policy.pretrain_lr must be > 0, got {self.pretrain_lr}")


@dataclass(frozen=True)
class IMDbConfig:
    """IMDb FedRLHF task settings (arXiv 2412.15538 §5.2: GPT-2 aligned to positive sentiment).

    Data: ``dataset`` is ``local`` (``DATA_DIR/imdb/{train,test}.parquet``) or a hub name such as
    ``stanfordnlp/imdb`` (needs network). ``clients`` disjoint shards of ``reviews_per_client``
    labelled training reviews each (``partition: iid``, or ``by_rating``: client k gets the k-th
    band of star ratings, a non-IID split). Prompts are the first ``prompt_tokens`` tokens of
    reviews from the public pool (training reviews no client holds).

    Policy: ``model: small`` is the offline GPT-2 of :class:`PolicyModelConfig`; any other value
    is a local path or hub name for ``AutoModelForCausalLM`` (e.g. ``gpt2``). ``tokenizer: trained``
    trains a byte-level BPE of ``vocab_size`` on the public pool; ``gpt2`` loads
    ``DATA_DIR/tokenizers/gpt2``; with a ``model`` path the model's own tokenizer is used.
    ``share: lora`` federates only the LoRA adapters (rank ``lora_rank``), ``full`` every weight.

    Feedback (:mod:`.reward`): client k's reward is ``λ_k·R_sentiment + (1−λ_k)·H_k``, with
    ``lambdas[k]`` and ``preferences[k]`` (one of length, topic, fluency; the lists are cycled when
    there are more clients than entries). The reward classifier trains on random ``reward_window``-word
    windows of the client's reviews, the length of text it will judge.

    RL (:mod:`.task`): TRL's GRPOTrainer, ``rl_steps`` optimizer steps per round of
    ``prompts_per_step`` prompts × ``num_generations`` completions of ``max_new_tokens`` tokens.

    ``device``: where the policy trains and samples (``auto`` = CUDA when available); the reward
    classifiers and the judge stay on the CPU.

    Evaluation (:mod:`.evaluation`): ``eval_prompts`` held-out test prompts per client, scored by a
    classifier trained on ``eval_classifier_reviews`` test reviews that no client's reward uses.
    """

    dataset: str = "local"
    clients: int = 5
    reviews_per_client: int = 1000
    partition: Literal["iid", "by_rating"] = "iid"
    public_reviews: int = 8000
    prompt_tokens: int = 8
    model: str = "small"
    tokenizer: Literal["trained", "gpt2"] = "trained"
    vocab_size: int = 8192
    policy: PolicyModelConfig = PolicyModelConfig()
    share: Literal["lora", "full"] = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lambdas: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    preferences: tuple[str, ...] = ("length", "topic", "fluency", "length", "topic")
    topic_words: tuple[str, ...] = (
        "acting",
        "actor",
        "actors",
        "actress",
        "cast",
        "performance",
        "role",
        "character",
        "characters",
        "played",
        "plays",
        "director",
        "story",
        "plot",
        "script",
    )
    length_target: int = 8
    reward_lr: float = 0.05
    reward_batch: int = 64
    reward_window: int = 16
    rl_steps: int = 12
    prompts_per_step: int = 4
    num_generations: int = 8
    max_new_tokens: int = 16
    rl_lr: float = 4e-3
    rl_beta: float = 0.05
    temperature: float = 1.0
    eval_prompts: int = 32
    eval_classifier_reviews: int = 5000
    samples_per_client: int = 4
    torch_threads: int = 1
    device: Literal["cpu", "cuda", "auto"] = "cpu"

    def __post_init__(self) -> None:
        for name in (
            "clients",
            "reviews_per_client",
            "public_reviews",
            "prompt_tokens",
            "vocab_size",
            "lora_rank",
            "length_target",
            "reward_batch",
            "reward_window",
            "rl_steps",
            "prompts_per_step",
            "num_generations",
            "max_new_tokens",
            "eval_prompts",
            "eval_classifier_reviews",
            "torch_threads",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"task.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_generations < 2:
            raise ValueError(f"task.num_generations must be >= 2 (GRPO compares completions of one prompt), got {self.num_generations}")
        if self.samples_per_client < 0:
            raise ValueError(f"task.samples_per_client must be >= 0, got {self.samples_per_client}")
        if not self.lambdas:
            raise ValueError("task.lambdas must list at least one λ_k")
        for i, lam in enumerate(self.lambdas):
            if not 0 <= lam <= 1:
                raise ValueError(f"task.lambdas[{i}] must be in [0, 1], got {lam}")
        if not self.preferences:
            raise ValueError("task.preferences must list at least one preference")
        for i, pref in enumerate(self.preferences):
            if pref not in PREFERENCES:
                raise ValueError(f"task.preferences[{i}] must be one of {', '.join(PREFERENCES)}, got {pref!r}")
        if not self.topic_words:
            raise ValueError("task.topic_words must list at least one word")
        for name in ("reward_lr", "rl_lr", "temperature", "lora_alpha"):
            if not getattr(self, name) > 0:
                raise ValueError(f"task.{name} must be > 0, got {getattr(self, name)}")
        if self.rl_beta < 0:
            raise ValueError(f"task.rl_beta must be >= 0, got {self.rl_beta}")
        if self.vocab_size < 512:
            raise ValueError(f"task.vocab_size must be >= 512 (byte-level BPE needs 256 byte tokens plus merges), got {self.vocab_size}")

    def torch_device(self) -> str:
        if self.device == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def lambda_for(self, client: int) -> float:
        return float(self.lambdas[client % len(self.lambdas)])

    def preference_for(self, client: int) -> str:
        return self.preferences[client % len(self.preferences)]
