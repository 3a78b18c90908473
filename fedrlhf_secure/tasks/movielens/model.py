"""The MovieLens policy ``π(a = high | user, item)`` and its parameter layout.

Architecture (issue 2): a **personal** user embedding, a **shared** item embedding, the item's genre
flags through a shared linear projection, concatenated and fed to a shared two-layer MLP that
outputs the logit of "high" (rating ≥ 4)::

    z = W2 · relu(W1 · [u_user ; e_item ; P g_item + p] + b1) + b2,    π(high) = σ(z)

The item embedding is declared ``sparse_rows``: a client only ever updates the rows of the items it
rated (see :class:`fedrlhf_secure.tasks.base.ParamEntry`). The same forward is implemented twice:
as a torch module for training (the standard ``nn.Embedding``/``nn.Linear`` layers, so Opacus can
compute per-sample gradients) and in numpy for evaluation and audits, where a torch graph would
only add overhead; a test checks they agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..base import ParamEntry, ParamSpec

ITEM_EMBEDDING = "item_embedding"
GENRE_WEIGHT = "genre_projection.weight"
GENRE_BIAS = "genre_projection.bias"
HIDDEN_WEIGHT = "mlp.hidden.weight"
HIDDEN_BIAS = "mlp.hidden.bias"
OUT_WEIGHT = "mlp.out.weight"
OUT_BIAS = "mlp.out.bias"
DENSE_NAMES = (GENRE_WEIGHT, GENRE_BIAS, HIDDEN_WEIGHT, HIDDEN_BIAS, OUT_WEIGHT, OUT_BIAS)


@dataclass(frozen=True)
class PolicyDims:
    num_items: int
    num_genres: int
    user_dim: int
    item_dim: int
    genre_dim: int
    hidden_dim: int

    def spec(self) -> ParamSpec:
        cat = self.user_dim + self.item_dim + self.genre_dim
        return ParamSpec(
            (
                ParamEntry(ITEM_EMBEDDING, (self.num_items, self.item_dim), sparse_rows=True),
                ParamEntry(GENRE_WEIGHT, (self.genre_dim, self.num_genres)),
                ParamEntry(GENRE_BIAS, (self.genre_dim,)),
                ParamEntry(HIDDEN_WEIGHT, (self.hidden_dim, cat)),
                ParamEntry(HIDDEN_BIAS, (self.hidden_dim,)),
                ParamEntry(OUT_WEIGHT, (1, self.hidden_dim)),
                ParamEntry(OUT_BIAS, (1,)),
            )
        )

    def init_shared(self, seed: int, embedding_scale: float) -> dict[str, np.ndarray]:
        """Embeddings ``N(0, embedding_scale²)``; linear layers with PyTorch's default uniform
        fan-in init, all from one seeded numpy generator so every process agrees."""
        rng = np.random.default_rng([seed, 0x1417])

        def linear(out_dim: int, in_dim: int) -> tuple[np.ndarray, np.ndarray]:
            bound = 1.0 / np.sqrt(in_dim)
            w = rng.uniform(-bound, bound, size=(out_dim, in_dim)).astype(np.float32)
            b = rng.uniform(-bound, bound, size=(out_dim,)).astype(np.float32)
            return w, b

        cat = self.user_dim + self.item_dim + self.genre_dim
        emb = (rng.standard_normal((self.num_items, self.item_dim)) * embedding_scale).astype(np.float32)
        gw, gb = linear(self.genre_dim, self.num_genres)
        hw, hb = linear(self.hidden_dim, cat)
        ow, ob = linear(1, self.hidden_dim)
        return {
            ITEM_EMBEDDING: emb,
            GENRE_WEIGHT: gw,
            GENRE_BIAS: gb,
            HIDDEN_WEIGHT: hw,
            HIDDEN_BIAS: hb,
            OUT_WEIGHT: ow,
            OUT_BIAS: ob,
        }

    def init_user(self, seed: int, user_index: int, embedding_scale: float) -> np.ndarray:
        rng = np.random.default_rng([seed, 0x05E4, user_index])
        return (rng.standard_normal(self.user_dim) * embedding_scale).astype(np.float32)


def _linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], device="meta")
    layer.weight = nn.Parameter(weight)
    layer.bias = nn.Parameter(bias)
    return layer


class PreferencePolicy(nn.Module):
    """Torch version of the policy over a (possibly compact) set of user and item rows.

    Built directly from parameter tensors (no random init is wasted): ``user_rows`` are the
    personal embeddings of the users this module serves and ``item_rows`` the item-embedding rows
    it may touch; indices passed to :meth:`forward` are positions in those tables.
    """

    def __init__(
        self, user_rows: torch.Tensor, item_rows: torch.Tensor, dense: Mapping[str, torch.Tensor], item_scale: float = 1.0
    ) -> None:
        super().__init__()
        self.item_scale = float(item_scale)
        self.user_embedding = nn.Embedding(user_rows.shape[0], user_rows.shape[1], _weight=user_rows)
        self.item_embedding = nn.Embedding(item_rows.shape[0], item_rows.shape[1], _weight=item_rows / self.item_scale)
        self.genre_projection = _linear(dense[GENRE_WEIGHT], dense[GENRE_BIAS])
        self.hidden = _linear(dense[HIDDEN_WEIGHT], dense[HIDDEN_BIAS])
        self.out = _linear(dense[OUT_WEIGHT], dense[OUT_BIAS])

    def forward(self, user: torch.Tensor, item: torch.Tensor, genres: torch.Tensor) -> torch.Tensor:
        items = self.item_embedding(item)
        if self.item_scale != 1.0:
            items = items * self.item_scale
        x = torch.cat([self.user_embedding(user), items, self.genre_projection(genres)], dim=1)
        return self.out(torch.relu(self.hidden(x))).squeeze(1)

    def item_rows(self) -> np.ndarray:
        """The item-embedding rows this module holds, in the shared parameter's units."""
        return (self.item_embedding.weight.detach() * self.item_scale).numpy().copy()

    def dense_state(self) -> dict[str, np.ndarray]:
        tensors = {
            GENRE_WEIGHT: self.genre_projection.weight,
            GENRE_BIAS: self.genre_projection.bias,
            HIDDEN_WEIGHT: self.hidden.weight,
            HIDDEN_BIAS: self.hidden.bias,
            OUT_WEIGHT: self.out.weight,
            OUT_BIAS: self.out.bias,
        }
        return {k: v.detach().numpy().copy() for k, v in tensors.items()}


def build_policy(
    shared: Mapping[str, np.ndarray], user_rows: np.ndarray, item_index: np.ndarray | None, *, item_scale: float = 1.0
) -> PreferencePolicy:
    """A trainable policy holding copies of ``shared`` (item rows ``item_index``, all when None)
    and of the given personal ``user_rows``.

    ``item_scale`` k stores the item table as ``rows / k`` and multiplies it back by k in the
    forward pass: the function is unchanged, but each record's gradient with respect to the
    stored rows is k times larger. Under DP-SGD, where every coordinate receives the same noise
    ``σC``, that raises the item rows' share of the clipped gradient and so their signal-to-noise
    ratio (see ``dp_item_scale`` in :class:`~.config.MovieLensConfig`); the optimiser's item
    learning rate is divided by k so a step moves the rows as far as before."""
    items = shared[ITEM_EMBEDDING] if item_index is None else shared[ITEM_EMBEDDING][item_index]
    dense = {k: torch.tensor(np.asarray(shared[k], dtype=np.float32)) for k in DENSE_NAMES}
    return PreferencePolicy(
        torch.tensor(np.asarray(user_rows, dtype=np.float32)),
        torch.tensor(np.asarray(items, dtype=np.float32)),
        dense,
        item_scale=item_scale,
    )


def numpy_logits(shared: Mapping[str, np.ndarray], user_vectors: np.ndarray, items: np.ndarray, genres: np.ndarray) -> np.ndarray:
    """``z`` for each row: ``user_vectors`` (N, d_u), ``items`` item indices (N,), ``genres`` (N, G)."""
    g = genres @ shared[GENRE_WEIGHT].T + shared[GENRE_BIAS]
    x = np.concatenate([user_vectors, shared[ITEM_EMBEDDING][items], g], axis=1)
    h = np.maximum(x @ shared[HIDDEN_WEIGHT].T + shared[HIDDEN_BIAS], 0.0)
    return (h @ shared[OUT_WEIGHT].T + shared[OUT_BIAS])[:, 0].astype(np.float32)


def torch_logits(shared: Mapping[str, np.ndarray], user_vectors: np.ndarray, items: np.ndarray, genres: np.ndarray) -> np.ndarray:
    """:func:`numpy_logits` computed by torch (float32, the same operations): a client's evaluation
    runs on torch's thread setting (``task.torch_threads``) rather than OpenBLAS's own pool, whose
    threads spin-wait between small matrix products and cost ~20× the CPU time of the products on a
    shared machine (measured: 1.2 CPU s against 0.05 s for 300 clients' evaluations)."""
    with torch.no_grad():
        t = {k: torch.from_numpy(np.require(shared[k], np.float32, "W")) for k in DENSE_NAMES}
        g = torch.nn.functional.linear(torch.from_numpy(np.asarray(genres, dtype=np.float32)), t[GENRE_WEIGHT], t[GENRE_BIAS])
        rows = torch.from_numpy(np.asarray(shared[ITEM_EMBEDDING], dtype=np.float32)[np.asarray(items)])
        x = torch.cat([torch.from_numpy(np.asarray(user_vectors, dtype=np.float32)), rows, g], dim=1)
        h = torch.relu(torch.nn.functional.linear(x, t[HIDDEN_WEIGHT], t[HIDDEN_BIAS]))
        return torch.nn.functional.linear(h, t[OUT_WEIGHT], t[OUT_BIAS])[:, 0].numpy().copy()
