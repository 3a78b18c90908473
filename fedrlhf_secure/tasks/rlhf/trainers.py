"""One round of local training with TRL's trainers, on the process's one LoRA policy.

``task.trainer_args`` go untouched into ``DPOConfig``/``GRPOConfig`` (``task.reward_args`` into
``RewardConfig``), after the few fields this module must own: where the trainer writes (a private
temporary folder, nothing saved), no reporting, the round's seed, CPU/GPU. Any TRL field works
(``beta``, ``learning_rate``, ``loss_type``, ``max_steps``, ...); an unknown one is an
:class:`~fedrlhf_secure.errors.InputError` naming it. The optimizer is fresh every round (FedAvg's
local step from the global model), so each round builds its trainer anew: on CPU that costs well
under a second next to the training itself.

**On-policy DPO** (the CPU default): FedRLHF's per-client feedback loop, with DPO (Rafailov et al.
2023) in place of PPO. Client k samples ``num_generations`` completions for each of
``prompts_per_round`` of its prompts from the current global policy, scores them with its own
shaped reward R_k = λ_k·R_sentiment,k + (1−λ_k)·H_k plus a Gumbel draw of scale ``human_noise[k]``
per completion (its simulated human: the argmax of reward + Gumbel noise is a Plackett-Luce /
Bradley-Terry choice), and keeps the top as chosen and the bottom as rejected. Sampling from the
policy being trained is what makes DPO move it: the same DPO on human-written pairs from other
reviews moved nothing in 60 steps (issue 15), as on-policy data is known to matter (Tajwar et al. 2024).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
import time
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import InputError
from ..base import FitConfig

if TYPE_CHECKING:
    from .task import RLHFClient

logger = logging.getLogger(__name__)


def _args(cls, defaults: dict[str, Any], user: dict[str, Any], workdir: str, config: FitConfig, device: str, section: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(user) - names)
    if unknown:
        raise InputError(f"task.{section}: {', '.join(unknown)} is not a field of TRL's {cls.__name__}")
    # float32 and no activation checkpointing unless asked: TRL 1.16 defaults to bf16 with gradient
    # checkpointing, which on CPU is slower and (with a LoRA model) fails its recomputation check.
    merged = {"bf16": False, "fp16": False, "gradient_checkpointing": False, **defaults, **user}
    merged.update(output_dir=workdir, report_to=[], save_strategy="no", seed=config.seed, use_cpu=device == "cpu", disable_tqdm=True)
    merged.setdefault("num_train_epochs", config.local_epochs)
    return cls(**merged)


@contextlib.contextmanager
def _quiet():
    """TRL and transformers chatter at INFO/WARNING on every train(); keep the run's own progress readable."""
    levels = {}
    for name in ("transformers", "trl", "accelerate", "peft"):
        lg = logging.getLogger(name)
        levels[name] = lg.level
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _train(trainer) -> tuple[Any, list[dict[str, Any]]]:
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    with _quiet():
        out = trainer.train()
    return out, list(trainer.state.log_history)


def _last(logs: list[dict[str, Any]], key: str) -> float:
    vals = [h[key] for h in logs if key in h]
    return float(np.mean(vals)) if vals else float("nan")


def _keep_ffa_frozen(policy) -> None:
    """Only the federated LoRA tensors train (FFA-LoRA: A stays at its shared seeded value)."""
    for name, p in policy.model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(name in policy.trainable)


def _drop_reference(policy) -> None:
    """Remove TRL's "ref" adapter copy and make the live adapter active again with A frozen."""
    if "ref" in getattr(policy.model, "peft_config", {}):
        policy.model.delete_adapter("ref")
    policy.model.set_adapter("default")
    _keep_ffa_frozen(policy)  # set_adapter marks A trainable again: FFA-LoRA keeps it frozen


DPO_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-3,
    "beta": 0.1,
    "per_device_train_batch_size": 8,
    "lr_scheduler_type": "constant",
    "logging_steps": 1,
}
"""What :func:`run_dpo` passes DPOConfig unless ``task.trainer_args`` says otherwise (the audit's
LOSS score reads its β, :meth:`~.task.RLHFTask.dpo_beta`)."""


def run_dpo(client: RLHFClient, rows: dict[str, list[str]], config: FitConfig) -> dict[str, float]:
    """TRL's DPOTrainer on ``rows`` (prompt/chosen/rejected) with the live policy. TRL makes the
    reference a frozen copy of the adapters as they are when the trainer is built, i.e. the global
    policy of this round (iterative, on-policy DPO); KL to the *base* model is what evaluation reports."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    task = client.task
    cfg = task.config
    policy = task.policy()
    defaults = DPO_DEFAULTS
    with tempfile.TemporaryDirectory(prefix=f"fedrlhf-dpo-{client.client_id}-") as tmp:
        args = _args(DPOConfig, defaults, cfg.trainer_args, tmp, config, cfg.torch_device(), "trainer_args")
        try:
            with _quiet():
                trainer = DPOTrainer(model=policy.model, args=args, train_dataset=Dataset.from_dict(rows), processing_class=task.tokenizer)
            t = time.perf_counter()
            out, logs = _train(trainer)
            seconds = time.perf_counter() - t
        finally:
            # TRL copies the live adapter into a frozen "ref" adapter: the round's reference policy is
            # the global policy the round started from (iterative DPO). Drop it so the next round copies anew.
            _drop_reference(policy)
    policy.model.eval()
    steps = max(1, trainer.state.global_step)
    return {
        "loss": float(out.training_loss),
        "dpo_steps": float(trainer.state.global_step),
        "dpo_reward_accuracy": _last(logs, "rewards/accuracies"),
        "dpo_reward_margin": _last(logs, "rewards/margins"),
        "seconds_train": seconds,
        "seconds_per_step": seconds / steps,
    }


def on_policy_dpo(client: RLHFClient, config: FitConfig) -> dict[str, float]:
    """Sample, let the client's simulated human pick (chosen, rejected), run DPO (see the module docstring)."""
    task = client.task
    cfg = task.config
    policy = task.policy()
    rng = np.random.default_rng(config.seed)
    prompts_all = client.data.prompts
    idx = rng.choice(len(prompts_all), size=min(cfg.prompts_per_round, len(prompts_all)), replace=False)
    prompts = [prompts_all[i] for i in idx]
    g = cfg.num_generations
    t = time.perf_counter()
    prompt_ids = policy.encode_prompts([p for p in prompts for _ in range(g)])
    completion_ids = policy.generate(prompt_ids, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=config.seed)
    completions = policy.decode(completion_ids)
    seconds_gen = time.perf_counter() - t
    parts = client.reward.components(completions, completion_ids)
    scores = parts["shaped"].reshape(len(prompts), g)
    noisy = scores + client.noise * rng.gumbel(size=scores.shape)
    rows: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": []}
    gaps = []
    for i, p in enumerate(prompts):
        best, worst = int(np.argmax(noisy[i])), int(np.argmin(noisy[i]))
        c, r = completions[i * g + best], completions[i * g + worst]
        if best == worst or c == r or not c.strip() or not r.strip():
            continue
        rows["prompt"].append(p)
        rows["chosen"].append(c)
        rows["rejected"].append(r)
        gaps.append(scores[i, best] - scores[i, worst])
    metrics = {
        "seconds_generate": seconds_gen,
        "pairs": float(len(rows["prompt"])),
        "sample_reward": float(scores.mean()),
        "sample_sentiment": float(parts["sentiment"].mean()),
        "pair_reward_gap": float(np.mean(gaps)) if gaps else float("nan"),
    }
    if len(rows["prompt"]) < 1:
        logger.warning("client %d: no usable pair this round (all samples equal); the update is zero", client.client_id)
        return metrics
    metrics.update(run_dpo(client, rows, config))
    return metrics


def offline_dpo(client: RLHFClient, config: FitConfig) -> dict[str, float]:
    """DPO on the client's own stored preference pairs (TRL's preference format)."""
    pairs = client.data.pairs
    if not len(pairs):
        raise InputError(f"client {client.task.client_names[client.client_id]} holds no preference pairs")
    return run_dpo(client, {"prompt": list(pairs.prompt), "chosen": list(pairs.chosen), "rejected": list(pairs.rejected)}, config)


class RewardModel:
    """Client k's Bradley-Terry reward model r_φ (Ouyang et al. 2022, eq. 1; TRL's RewardTrainer) on its
    own preference pairs: a sequence-classification head on the base model with LoRA, trained once on
    the client's first round and kept as its personal state (it never leaves the client).
    Callable as a TRL reward function: the score of prompt + completion."""

    __name__ = "reward_model"

    def __init__(self, client: RLHFClient, config: FitConfig) -> None:
        import torch
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import AutoModelForSequenceClassification
        from trl import RewardConfig, RewardTrainer

        task = client.task
        cfg = task.config
        pairs = client.data.pairs
        if not len(pairs) or not pairs.has_pairs:
            raise InputError(f"task.reward: model needs preference pairs; client {task.client_names[client.client_id]} holds none")
        self.tokenizer = task.tokenizer
        model = AutoModelForSequenceClassification.from_pretrained(task.model_path, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = self.tokenizer.pad_token_id
        peft = LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, target_modules=list(cfg.lora.targets), task_type="SEQ_CLS")
        rows = {
            "chosen": [p + c for p, c in zip(pairs.prompt, pairs.chosen, strict=True)],
            "rejected": [p + r for p, r in zip(pairs.prompt, pairs.rejected, strict=True)],
        }
        defaults = {"learning_rate": 1e-3, "per_device_train_batch_size": 8, "logging_steps": 1, "max_length": 128}
        with tempfile.TemporaryDirectory(prefix=f"fedrlhf-rm-{client.client_id}-") as tmp:
            args = _args(RewardConfig, defaults, cfg.reward_args, tmp, config, cfg.torch_device(), "reward_args")
            with _quiet():
                trainer = RewardTrainer(
                    model=model, args=args, train_dataset=Dataset.from_dict(rows), processing_class=self.tokenizer, peft_config=peft
                )
            t = time.perf_counter()
            _, logs = _train(trainer)
            self.seconds = time.perf_counter() - t
        self.model = trainer.model.eval()
        self.accuracy = _last(logs, "accuracy")
        self.steps = trainer.state.global_step

    def score(self, texts: list[str]) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for s in range(0, len(texts), 32):
                enc = self.tokenizer(texts[s : s + 32], return_tensors="pt", padding=True, truncation=True, max_length=128)
                out.append(self.model(**enc).logits[:, 0].float().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def __call__(self, prompts=None, completions=None, **_: Any) -> list[float]:
        return self.score([p + c for p, c in zip(prompts, completions, strict=True)]).tolist()


class ShapedModelReward:
    """FedRLHF's shaped reward (arXiv 2412.15538, eq. 3) with the client's own reward model as the
    task reward: R_k = λ_k·σ(r_φ,k(x, y)) + (1−λ_k)·H_k(y).

    σ maps the Bradley-Terry score to (0, 1), the scale of H_k (length, topic or fluency preference),
    so λ_k weighs like terms: σ(r_φ(x, y)) is the Bradley-Terry probability that y beats a completion
    scored 0 (Ouyang et al. 2022, eq. 1). Used with ``reward: model`` on the IMDb preset, where every
    client has its own H_k; with your own data the reward model alone is the reward."""

    __name__ = "shaped_reward_model"

    def __init__(self, shaped, model: RewardModel) -> None:
        self.shaped = shaped
        self.model = model

    def components(self, prompts: list[str], completions: list[str], completion_ids) -> dict[str, np.ndarray]:
        parts = self.shaped.components(completions, completion_ids)
        rm = 1.0 / (1.0 + np.exp(-self.model.score([p + c for p, c in zip(prompts, completions, strict=True)])))
        lam = self.shaped.lam
        return {"reward_model": rm, "preference": parts["preference"], "shaped": lam * rm + (1 - lam) * parts["preference"]}

    def __call__(self, prompts=None, completions=None, completion_ids=None, **_: Any) -> list[float]:
        return self.components(list(prompts), list(completions), completion_ids)["shaped"].tolist()


def grpo(client: RLHFClient, config: FitConfig) -> dict[str, float]:
    """TRL's GRPOTrainer (Shao et al. 2024) on ``prompts_per_round`` of the client's prompts, with its
    shaped reward R_k (``reward: shaped``) or its own reward model (``reward: model``; on the IMDb
    preset shaped by λ_k and H_k, :class:`ShapedModelReward`)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    task = client.task
    cfg = task.config
    policy = task.policy()
    metrics: dict[str, float] = {}
    if cfg.reward == "model":
        if client.reward_model is None:
            client.reward_model = RewardModel(client, config)
            metrics.update(
                {
                    "rm_accuracy": client.reward_model.accuracy,
                    "rm_steps": float(client.reward_model.steps),
                    "seconds_rm": client.reward_model.seconds,
                }
            )
        reward = client.reward_model if client.reward is None else ShapedModelReward(client.reward, client.reward_model)
    else:
        reward = client.reward
    rng = np.random.default_rng(config.seed)
    prompts_all = client.data.prompts
    idx = rng.choice(len(prompts_all), size=min(cfg.prompts_per_round, len(prompts_all)), replace=False)
    g = cfg.num_generations
    defaults = {
        "learning_rate": 1e-3,
        "beta": 0.04,
        "per_device_train_batch_size": 4 * g,
        "num_generations": g,
        "max_completion_length": cfg.max_new_tokens,
        "temperature": cfg.temperature,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "log_completions": False,
    }
    with tempfile.TemporaryDirectory(prefix=f"fedrlhf-grpo-{client.client_id}-") as tmp:
        args = _args(GRPOConfig, defaults, cfg.trainer_args, tmp, config, cfg.torch_device(), "trainer_args")
        args.num_train_epochs = cfg.trainer_args.get("num_train_epochs", 1)
        try:
            with _quiet():
                trainer = GRPOTrainer(
                    model=policy.model,
                    reward_funcs=[reward],
                    args=args,
                    train_dataset=Dataset.from_dict({"prompt": [prompts_all[i] for i in idx]}),
                    processing_class=task.tokenizer,
                )
            _keep_ffa_frozen(policy)
            t = time.perf_counter()
            out, logs = _train(trainer)
            seconds = time.perf_counter() - t
        finally:
            # As for DPO: with beta > 0 TRL copies the live adapter into a frozen "ref" adapter (the
            # KL anchor is the round's global policy); the next client and round must copy anew.
            _drop_reference(policy)
    policy.model.eval()
    steps = max(1, trainer.state.global_step)
    metrics.update(
        {
            "loss": float(out.training_loss),
            "grpo_steps": float(trainer.state.global_step),
            "rl_reward": _last(logs, "reward"),
            "grpo_kl": _last(logs, "kl"),
            "seconds_train": seconds,
            "seconds_per_step": seconds / steps,
        }
    )
    return metrics
