"""Record-level DP-SGD without Opacus: per-sample gradients from ``torch.func``, clipped, summed, noised.

Opacus (:func:`.dpsgd.make_private`) wraps the model in hooks and, in ghost-clipping mode, runs two
backward passes per step; for the small MovieLens policy its bookkeeping (hook dispatch, a
``deepcopy`` of every gradient, ``unique`` over the embedding indices, warnings) costs more than the
arithmetic (``fedrlhf bench dp``; docs/dp.md). This engine is the same mechanism (Abadi et al. 2016,
Algorithm 1) done directly, one step at a time:

1. **Poisson sampling** at the plan's rate q, ``int(1/q)`` steps per epoch, exactly as Opacus'
   ``DPDataLoader`` draws it (``torch.rand(n) < q`` from a secret generator), so the steps the
   plan calibrated for, the steps taken and the steps the ledger records stay one number
   (:func:`.record_level.steps_per_epoch`).
2. **Per-sample gradients** handed in by the task
   (:func:`fedrlhf_secure.tasks.movielens.train.record_gradients`), either from
   ``torch.func.vmap(grad(·))`` over the records or, faster, from one batched backward pass to each
   layer's output: a dense parameter's as a ``(B, *shape)`` tensor (:class:`Dense`), a linear
   weight's as the two factors of its outer product (:class:`Outer`), an embedding table's as the
   one row each record reads (:class:`Rows`). A record's gradient with respect to a table is zero
   outside the row it looked up, so the row carries the whole per-sample gradient and its norm; the
   (B, rows, dim) tensor Opacus' ``hooks`` mode would build is never materialised.
3. **Flat clipping** to C: each record's norm over all parameters (the norm of the per-parameter
   norms, as Opacus computes it), factor ``min(1, C / (‖g_i‖ + 1e-6))`` (Opacus' constant).
4. **Audit canaries** (:class:`.dpsgd.AuditBlock`) go into the clipped sum of the audit block,
   before the noise, by the same method the Opacus path calls.
5. **Gaussian noise** ``N(0, σ²C²)`` on every coordinate of every trainable parameter, drawn by
   ``torch.normal`` from a secret torch generator (:mod:`.randomness`) parameter by parameter in
   the optimizer's order: the draws Opacus' ``add_noise`` makes from the same generator state
   (``tests/test_per_sample_dpsgd.py`` checks bit for bit).
6. The noisy sum divided by the expected batch size ``round(q·n)``, then the task's own optimizer
   steps (the same Adam the Opacus path wraps).

Everything that touches the guarantee (sampling, clipping, noise, the step count) is here, not in
the task; the task only computes per-record gradients, which must each depend on one record.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from .dpsgd import DPSGDSettings
from .randomness import secret_torch_generator

logger = logging.getLogger(__name__)

PER_SAMPLE_ENGINES = ("direct", "functorch", "opacus")
"""``privacy.per_sample``: this module's engine fed by per-sample gradients from one batched backward
pass (``direct``, the default), the same engine fed by ``torch.func.vmap(grad(·))`` (``functorch``),
or Opacus (:func:`.dpsgd.make_private`), kept as the reference both are tested against."""

OPACUS_NORM_EPS = 1e-6
"""Opacus' ``clip_and_accumulate``: ``C / (norm + 1e-6)``; the same constant keeps the two equal."""


@dataclass(frozen=True)
class Dense:
    """Per-sample gradients of a dense parameter: ``(B, *param.shape)``."""

    grads: torch.Tensor


@dataclass(frozen=True)
class Rows:
    """Per-sample gradients of an embedding table: record i's gradient is ``rows[i]`` on row
    ``index[i]`` and zero elsewhere (one lookup per record)."""

    index: torch.Tensor
    rows: torch.Tensor


@dataclass(frozen=True)
class Outer:
    """Per-sample gradients of a linear layer's weight seen once per record: record i's gradient is
    the outer product ``left[i] ⊗ right[i]`` (the gradient at the layer's output times its input,
    Goodfellow 2015, "Efficient per-example gradient computations"). Its norm is
    ``‖left[i]‖·‖right[i]‖`` (the ghost-norm identity, Li et al. 2022) and the clipped sum one
    matrix product, so the (B, out, in) tensor is never built."""

    left: torch.Tensor
    right: torch.Tensor


PerSample = Dense | Rows | Outer


def _norms(g: PerSample, batch: int) -> torch.Tensor:
    if isinstance(g, Rows):
        return g.rows.reshape(batch, -1).norm(2, dim=-1)
    if isinstance(g, Outer):
        return g.left.reshape(batch, -1).norm(2, dim=-1) * g.right.reshape(batch, -1).norm(2, dim=-1)
    return g.grads.reshape(batch, -1).norm(2, dim=-1)


def _clipped_sum(param: torch.Tensor, g: PerSample, factor: torch.Tensor) -> torch.Tensor:
    if isinstance(g, Rows):
        out = torch.zeros_like(param)
        return out.index_add_(0, g.index, g.rows * factor.reshape(-1, *([1] * (g.rows.dim() - 1))))
    if isinstance(g, Outer):
        return (g.left * factor[:, None]).T.matmul(g.right).reshape(param.shape)
    return torch.einsum("i,i...", factor, g.grads)


class FunctionalDPSGD:
    """One client's DP-SGD over ``num_records`` records; the optimizer is the task's own (with the
    audit block attached when ``dp.audit_block`` is set).

    ``sampling_generator`` / ``noise_generator``: secret by default (:func:`.randomness.secret_torch_generator`);
    tests pass seeded ones to compare with Opacus draw for draw. Nothing in a config reaches them."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        num_records: int,
        dp: DPSGDSettings,
        *,
        sampling_generator: torch.Generator | None = None,
        noise_generator: torch.Generator | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.num_records = int(num_records)
        self.dp = dp
        self.sampling_generator = sampling_generator or secret_torch_generator()
        self.noise_generator = noise_generator or secret_torch_generator()
        self.expected_batch_size = max(1, int(round(dp.sample_rate * self.num_records)))
        self.block = dp.audit_block
        if self.block is not None:
            self.block.attach(optimizer)
            self.block.arm(dp.sample_rate, secret_torch_generator())
        # Opacus' ``params(optimizer)``: every trainable parameter, in param-group order (the noise order)
        self.params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        self.steps = 0
        self.last_norms: torch.Tensor | None = None

    def epoch(self) -> Iterator[torch.Tensor]:
        """The record indices of each step of one epoch: ``int(1/q)`` Poisson batches (Opacus'
        ``UniformWithReplacementSampler``: ``torch.rand(n) < q``, possibly empty)."""
        q = self.dp.sample_rate
        for _ in range(int(1 / q)):
            mask = torch.rand(self.num_records, generator=self.sampling_generator) < q
            yield mask.nonzero(as_tuple=False).reshape(-1)

    def clipped_sums(self, grads: Mapping[torch.Tensor, PerSample], batch: int) -> list[torch.Tensor]:
        """Σ_i min(1, C/‖g_i‖) g_i per trainable parameter (zeros for a parameter no record reaches,
        such as the audit block, or for an empty batch); sets :attr:`last_norms`."""
        for p in grads:
            if not any(p is q for q in self.params):
                raise ValueError("per-sample gradients given for a parameter the optimizer does not train")
        if batch == 0:
            self.last_norms = torch.zeros(0)
            return [torch.zeros_like(p) for p in self.params]
        by_id = {id(p): g for p, g in grads.items()}
        per_param = [_norms(g, batch) for g in by_id.values()]
        norms = torch.stack(per_param, dim=1).norm(2, dim=1)
        self.last_norms = norms
        factor = (self.dp.max_grad_norm / (norms + OPACUS_NORM_EPS)).clamp(max=1.0)
        return [_clipped_sum(p, by_id[id(p)], factor) if id(p) in by_id else torch.zeros_like(p) for p in self.params]

    def noisy_gradients(self, grads: Mapping[torch.Tensor, PerSample], batch: int) -> None:
        """Sets ``p.grad`` of every trainable parameter to (clipped sum + canaries + noise) / E[B]."""
        sums = self.clipped_sums(grads, batch)
        self.steps += 1
        std = self.dp.noise_multiplier * self.dp.max_grad_norm
        for p, s in zip(self.params, sums, strict=True):
            if self.block is not None and p is self.block.param:
                self.block.add_canaries(s)
            if std != 0:  # Opacus draws nothing at std 0 (the generator state must move as its does)
                s = s + torch.normal(mean=0.0, std=std, size=s.shape, generator=self.noise_generator)
            p.grad = s.view_as(p).div_(self.expected_batch_size)

    def step(self, grads: Mapping[torch.Tensor, PerSample], batch: int) -> None:
        """One noisy step: :meth:`noisy_gradients`, then the task's optimizer."""
        self.noisy_gradients(grads, batch)
        self.optimizer.step()
        for p in self.params:
            p.grad = None
