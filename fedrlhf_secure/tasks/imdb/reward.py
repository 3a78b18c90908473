"""Each client's human feedback: its own sentiment classifier, shaped by its own preference.

FedRLHF (arXiv 2412.15538 §4, eq. 3) gives client k the reward

    R_k(x, y) = λ_k · R_sentiment,k(y) + (1 − λ_k) · H_k(y)

* ``R_sentiment,k`` is P(positive | y) from a bag-of-words logistic classifier trained **only on
  client k's labelled reviews** (the feedback its humans gave), optionally with record-level
  DP-SGD (Opacus). It is trained a few epochs every round, so under DP the privacy plan accounts
  exactly the noisy steps each round reports. The classifier is the client's personal state: it
  never leaves the client.
* ``H_k`` is the client's own taste, a number in [0, 1]:
  ``length`` (completions that end near ``length_target`` tokens), ``topic`` (mentions of the
  client's topic words) or ``fluency`` (the mean probability the *initial* policy gives each
  completion token, so the client rewards text that still reads like the pretrained model).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ...privacy.dpsgd import make_private

_WORD = re.compile(r"[a-z']+")
WORD_BUCKETS = 1 << 15


class SentimentClassifier(nn.Module):
    """Mean of learned (hashed) word embeddings → linear logit (a bag-of-words logistic model)."""

    def __init__(self, vocab_size: int = WORD_BUCKETS, dim: int = 8) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim)
        self.head = nn.Linear(dim, 1)
        nn.init.normal_(self.embedding.weight, std=0.01)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(self.embedding.weight.dtype)
        pooled = (self.embedding(ids) * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.head(pooled).squeeze(-1)

    @torch.no_grad()
    def prob_positive(self, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        self.eval()
        return torch.sigmoid(self(ids, mask)).numpy().astype(np.float64)


def encode(texts: Sequence[str], max_words: int, buckets: int = WORD_BUCKETS) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded hashed word ids (CRC-32 of each lower-cased word, mod ``buckets``) and mask.

    The reward reads *words*, not the policy's sub-word tokens: a classifier over BPE fragments
    rewards fragments that happen to co-occur with praise, and the policy learns to emit them
    (reward hacking the judge does not share). Empty texts become one padding bucket with mask 1.
    """
    rows = [[zlib.crc32(w.encode()) % buckets for w in _WORD.findall(t.lower())[:max_words]] for t in texts]
    width = max([1, *(len(r) for r in rows)])
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        else:
            mask[i, 0] = 1
    return ids, mask


def windows(ids: torch.Tensor, mask: torch.Tensor, width: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random ``width``-word window of each review.

    The reward judges completions of a dozen or so words; a classifier trained on whole reviews is
    unsure on such short texts (P(positive) stays near 0.5 whatever the words), and its small
    spread drowns in the preference term of the shaped reward. Trained on windows of the length it
    will judge, it says "positive" with the confidence a short text deserves.
    """
    lengths = mask.sum(1)
    start = (torch.rand(len(ids), generator=gen) * (lengths - width).clamp_min(0).add(1).float()).long()
    cols = (start.unsqueeze(1) + torch.arange(width).unsqueeze(0)).clamp_max(ids.shape[1] - 1)
    w_mask = mask.gather(1, cols) * (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return ids.gather(1, cols), w_mask


def _bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(logits, labels.float())


def train_classifier(
    model: SentimentClassifier,
    ids: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch: int,
    seed: int,
    window: int,
) -> int:
    """Plain mini-batch Adam on random ``window``-word windows of the client's labelled reviews; returns the steps taken."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    steps = 0
    for _ in range(epochs):
        order = torch.randperm(len(ids), generator=gen)
        for s in range(0, len(ids), batch):
            idx = order[s : s + batch]
            opt.zero_grad(set_to_none=True)
            _bce(model(*windows(ids[idx], mask[idx], window, gen)), labels[idx]).backward()
            opt.step()
            steps += 1
    model.eval()
    return steps


def train_classifier_dp(
    model: SentimentClassifier,
    ids: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    dp: Any,
    seed: int,
    window: int,
) -> int:
    """Record-level DP-SGD (Opacus): each labelled review is one record.

    Poisson batches at the plan's ``sample_rate`` through an Opacus ``DPDataLoader`` (passed with
    ``poisson_sampling=False`` so ``make_private`` keeps the planned rate), per-sample clipping to
    ``max_grad_norm`` and Gaussian noise ``noise_multiplier · max_grad_norm``; ``epochs / sample_rate``
    noisy steps, reported for the run's accountant (Opacus's own accountant is not consulted).
    The noise and the Poisson batches come from secret generators (:mod:`fedrlhf_secure.privacy.randomness`),
    never from ``seed``, which only picks the review windows.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    module, dp_optimizer, loader, _ = make_private(model, optimizer, len(ids), dp)
    module.train()
    gen = torch.Generator().manual_seed(seed + 2)
    steps = 0
    for _ in range(epochs):
        for (idx,) in loader:
            dp_optimizer.zero_grad(set_to_none=True)
            if len(idx):
                _bce(module(*windows(ids[idx], mask[idx], window, gen)), labels[idx]).backward()
            else:  # an empty Poisson batch still takes a (pure-noise) step
                for p in module.parameters():
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
            dp_optimizer.step()
            steps += 1
    module._close()
    model.eval()
    return steps


# ------------------------------------------------------------------------------- preferences H_k


def length_preference(completion_ids: Sequence[Sequence[int]], target: int) -> np.ndarray:
    """1 at exactly ``target`` tokens, falling linearly to 0 at 0 or 2·target tokens."""
    n = np.asarray([len(c) for c in completion_ids], dtype=np.float64)
    return np.clip(1.0 - np.abs(n - target) / target, 0.0, 1.0)


def topic_preference(completions: Sequence[str], words: Sequence[str]) -> np.ndarray:
    """Mentions of the topic words, saturating at two (so repeating one word forever earns nothing more)."""
    topic = {w.lower() for w in words}
    hits = [sum(w in topic for w in _WORD.findall(c.lower())) for c in completions]
    return np.minimum(np.asarray(hits, dtype=np.float64) / 2.0, 1.0)


@torch.no_grad()
def fluency_preference(
    completion_ids: Sequence[Sequence[int]], token_logprobs: Callable[[list[list[int]]], list[np.ndarray]]
) -> np.ndarray:
    """Mean per-token probability under the initial policy (0 for an empty completion)."""
    lps = token_logprobs([list(c) for c in completion_ids])
    return np.asarray([float(np.exp(lp).mean()) if len(lp) else 0.0 for lp in lps], dtype=np.float64)


@dataclass
class ShapedReward:
    """``R_k = λ_k·R_sentiment,k + (1−λ_k)·H_k``, callable as a TRL reward function."""

    classifier: SentimentClassifier
    lam: float
    preference: str
    length_target: int
    topic_words: tuple[str, ...]
    reference_logprobs: Callable[[list[list[int]]], list[np.ndarray]]
    max_len: int = 64

    @property
    def __name__(self) -> str:  # TRL names its reward metrics after the function
        return "shaped_reward"

    def components(self, completions: Sequence[str], completion_ids: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        ids, mask = encode(completions, self.max_len)
        sentiment = self.classifier.prob_positive(ids, mask)
        if self.preference == "length":
            pref = length_preference(completion_ids, self.length_target)
        elif self.preference == "topic":
            pref = topic_preference(completions, self.topic_words)
        elif self.preference == "fluency":
            pref = fluency_preference(completion_ids, self.reference_logprobs)
        else:
            raise ValueError(f"unknown preference {self.preference!r}")
        return {"sentiment": sentiment, "preference": pref, "shaped": self.lam * sentiment + (1 - self.lam) * pref}

    def __call__(self, prompts=None, completions=None, completion_ids=None, **_: Any) -> list[float]:
        return self.components(completions, completion_ids)["shaped"].tolist()
