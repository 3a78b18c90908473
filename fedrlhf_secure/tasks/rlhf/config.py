"""The ``task:`` section for ``kind: rlhf`` (validated by :func:`fedrlhf_secure.configtypes.from_mapping`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..imdb.config import PREFERENCES
from .models import TinyModelConfig

IMDB_TOPIC_WORDS = (
    "acting",
    "actor",
    "actors",
    "cast",
    "performance",
    "role",
    "character",
    "characters",
    "director",
    "story",
    "plot",
    "script",
)


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters (Hu et al. 2022) on ``targets``; ``scheme`` says how they are federated.

    ``ffa`` (FFA-LoRA, Sun et al., ICLR 2024): every client builds A from the same seed and keeps it
    frozen; only B trains and only B is federated. The update ΔW = B·A is then linear in B, so the
    weighted mean of the clients' B gives exactly the weighted mean of their ΔW (FedAvg is exact),
    and DP noise lands on half the coordinates. ``naive`` federates A and B and averages each on its
    own: mean(B)·mean(A) ≠ mean(B·A) (see :func:`fedrlhf_secure.tasks.rlhf.lora.product_error`).
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    scheme: Literal["ffa", "naive"] = "ffa"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"task.lora.rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"task.lora.alpha must be > 0, got {self.alpha}")
        if not self.targets:
            raise ValueError("task.lora.targets must name at least one module (e.g. q_proj)")


@dataclass(frozen=True)
class RLHFConfig:
    """Federated RLHF on a causal LM with TRL (see docs/rlhf.md).

    **Data** (:mod:`.data`). ``data: imdb`` is the IMDb preset (``DATA_DIR/imdb/{train,test}.parquet``):
    prompts are the first ``prompt_tokens`` tokens of reviews, each client holds
    ``reviews_per_client`` labelled training reviews (its human feedback) and preference pairs are
    built from them (chosen = a positive review's continuation, rejected = a negative one's, as in the
    IMDb experiment of Rafailov et al. 2023). Anything else is data in one of TRL's standard formats
    (``prompt``; ``prompt/chosen/rejected``; implicit ``chosen/rejected``) read with HF datasets
    from a local ``.jsonl``/``.json``/``.parquet``/``.csv`` file, a folder of them, or a hub name.
    ``partition``: ``user`` gives one client per distinct value of ``user_column`` (one client per
    annotator, ``clients`` is then ignored), ``dirichlet`` deals rows to ``clients`` clients with
    proportions ~ Dir(``dirichlet_alpha``) (non-IID sizes; per value of ``user_column`` when it is
    set), ``iid`` deals them evenly at random. ``eval_fraction`` of each client's prompts is held out.

    **Trainer** (:mod:`.trainers`). ``trainer: dpo`` runs TRL's DPOTrainer; with ``on_policy: true``
    each round a client samples ``num_generations`` completions for ``prompts_per_round`` of its
    prompts from the current global policy, scores them with its own shaped reward
    R_k = λ_k·R_sentiment,k + (1−λ_k)·H_k plus its simulated human's noise (a Gumbel draw of scale
    ``human_noise[k]``, i.e. a Bradley-Terry/Plackett-Luce rater) and keeps (best, worst) as
    (chosen, rejected). With ``on_policy: false`` it trains on its own stored pairs. ``trainer: grpo``
    runs GRPOTrainer with ``reward: shaped`` (R_k) or ``reward: model`` (a Bradley-Terry reward model
    trained per client on its own pairs with TRL's RewardTrainer, the classical RLHF pipeline).
    ``trainer_args`` go untouched into DPOConfig/GRPOConfig, ``reward_args`` into RewardConfig.

    **Policy**: ``model`` (:mod:`.models`: ``smollm2-135m``, ``tiny``, a path or a hub name); LoRA
    (:class:`LoRAConfig`), only its adapters are federated.

    **Evaluation**: ``eval_prompts`` held-out prompts per client (IMDb: test-split openings), judged by
    a TF-IDF + logistic-regression classifier trained on ``eval_classifier_reviews`` test reviews that
    no client's reward sees, and by a sentiment lexicon; KL to the base model; ``samples_per_client``
    generations filed in the run directory. ``judge_calibration: length`` (default) sets the judge's
    threshold so that, on the real ``max_new_tokens``-token continuations of held-out test reviews,
    it calls as many positive as truly are (the judge trained on full reviews is biased positive on
    short text; see :func:`~fedrlhf_secure.tasks.rlhf.task.calibrate_judge`); ``fixed`` uses 0.5.
    """

    data: str = "imdb"
    format: Literal["auto", "prompt", "preference", "implicit"] = "auto"
    user_column: str | None = None
    partition: Literal["iid", "user", "dirichlet"] = "iid"
    dirichlet_alpha: float = 0.5
    eval_fraction: float = 0.1
    clients: int = 5
    reviews_per_client: int = 500
    public_reviews: int = 4000
    prompt_tokens: int = 8
    model: str = "smollm2-135m"
    tiny: TinyModelConfig = TinyModelConfig()
    lora: LoRAConfig = LoRAConfig()
    trainer: Literal["dpo", "grpo"] = "dpo"
    on_policy: bool = True
    reward: Literal["shaped", "model"] = "shaped"
    trainer_args: dict[str, Any] = field(default_factory=dict)
    reward_args: dict[str, Any] = field(default_factory=dict)
    prompts_per_round: int = 16
    num_generations: int = 4
    max_new_tokens: int = 16
    temperature: float = 1.0
    lambdas: tuple[float, ...] = (0.9, 0.8, 0.7, 0.6, 0.5)
    preferences: tuple[str, ...] = ("length", "topic", "fluency", "length", "topic")
    human_noise: tuple[float, ...] = (0.05,)
    length_target: int = 12
    topic_words: tuple[str, ...] = IMDB_TOPIC_WORDS
    reward_window: int = 16
    reward_lr: float = 0.05
    reward_batch: int = 64
    eval_prompts: int = 20
    eval_classifier_reviews: int = 5000
    judge_calibration: Literal["length", "fixed"] = "length"
    samples_per_client: int = 4
    torch_threads: int = 2
    device: Literal["cpu", "cuda", "auto"] = "cpu"

    def __post_init__(self) -> None:
        for name in (
            "clients",
            "reviews_per_client",
            "public_reviews",
            "prompt_tokens",
            "prompts_per_round",
            "max_new_tokens",
            "length_target",
            "reward_window",
            "reward_batch",
            "eval_prompts",
            "eval_classifier_reviews",
            "torch_threads",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"task.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_generations < 2:
            raise ValueError(f"task.num_generations must be >= 2 (a pair needs two completions), got {self.num_generations}")
        if self.samples_per_client < 0:
            raise ValueError(f"task.samples_per_client must be >= 0, got {self.samples_per_client}")
        if self.partition == "user" and not self.user_column:
            raise ValueError("task.partition: user needs task.user_column (the annotator column)")
        if not self.dirichlet_alpha > 0:
            raise ValueError(f"task.dirichlet_alpha must be > 0, got {self.dirichlet_alpha}")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"task.eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if not self.lambdas:
            raise ValueError("task.lambdas must list at least one λ_k")
        for i, lam in enumerate(self.lambdas):
            if not 0 <= lam <= 1:
                raise ValueError(f"task.lambdas[{i}] must be in [0, 1], got {lam}")
        for i, pref in enumerate(self.preferences):
            if pref not in PREFERENCES:
                raise ValueError(f"task.preferences[{i}] must be one of {', '.join(PREFERENCES)}, got {pref!r}")
        if not self.preferences or not self.human_noise:
            raise ValueError("task.preferences and task.human_noise must list at least one entry")
        for i, s in enumerate(self.human_noise):
            if s < 0:
                raise ValueError(f"task.human_noise[{i}] must be >= 0, got {s}")
        for name in ("temperature", "reward_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"task.{name} must be > 0, got {getattr(self, name)}")
        if self.trainer == "dpo" and self.reward == "model":
            raise ValueError("task.reward: model drives GRPO; set task.trainer: grpo (DPO needs no reward model)")

    @property
    def imdb(self) -> bool:
        return self.data == "imdb"

    def torch_device(self) -> str:
        if self.device == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def lambda_for(self, client: int) -> float:
        return float(self.lambdas[client % len(self.lambdas)])

    def preference_for(self, client: int) -> str:
        return self.preferences[client % len(self.preferences)]

    def noise_for(self, client: int) -> float:
        return float(self.human_noise[client % len(self.human_noise)])
