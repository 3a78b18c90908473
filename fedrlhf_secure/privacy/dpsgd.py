"""Record-level DP-SGD settings handed to a task's local training, and the Opacus wiring (:func:`make_private`);
the engine that does the same without Opacus (``privacy.per_sample: direct | functorch``) is :mod:`.per_sample`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecordCanaries:
    """One client's white-box Dirac canaries inside its DP-SGD (``privacy.audit_canaries``, record level).

    Canary j is a *record* whose clipped per-sample gradient is ``values[j] · e_{offsets[j]}`` on the
    audit block (:class:`AuditBlock`), ``|values[j]| = max_grad_norm``: the largest gradient one
    record may contribute, all of it on one coordinate (a Dirac canary, Nasr et al. 2023 "Tight
    auditing of differentially private machine learning"; Steinke, Nasr & Jagielski 2023 §6
    white-box). Like every record it is Poisson-sampled into each step at the plan's rate q,
    independently of the other records and of the step's noise. Its sign is ``s_j`` for a kept
    canary and ``-s_j`` for a dropped one: the two worlds of one canary are the data sets with this
    record replaced by its mirror image, the dominating pair of the replace-one accountant
    (``(1-q)N(0,σ²) + qN(±C, σ²)``, :mod:`.accountants`), so the run's ε covers each canary exactly
    as it covers one real rating."""

    offsets: np.ndarray
    values: np.ndarray


class AuditBlock:
    """The audit block of one fit: a trainable vector the model never reads, trained by the same DP-SGD.

    :func:`make_private` adds it to the wrapped optimizer as one more parameter group (the first group's
    learning rate and weight decay), so Opacus treats it like every other parameter: no record's
    gradient reaches it (a zero per-sample gradient, which clipping leaves at zero), the canaries go
    into its sum of clipped gradients, Opacus adds the step's noise ``N(0, σ²C²)`` to each of its
    coordinates from the same generator, divides by the expected batch size, and the task's own
    optimizer steps it. Its change over the fit is released with the update
    (:mod:`fedrlhf_secure.privacy.canaries`)."""

    def __init__(self, start: np.ndarray, canaries: RecordCanaries | None) -> None:
        self.start = np.asarray(start, dtype=np.float32).reshape(-1).copy()
        self.canaries = canaries
        self.param = None
        self.steps = 0
        self.sampled = 0
        self._rate, self._generator, self._offsets, self._values = 0.0, None, None, None

    def delta(self) -> np.ndarray:
        """The block's change over the fit (zeros when no DP-SGD step ran)."""
        if self.param is None:
            return np.zeros_like(self.start)
        return self.param.detach().cpu().numpy().astype(np.float32).reshape(-1) - self.start

    def attach(self, optimizer) -> None:
        import torch

        self.param = torch.nn.Parameter(torch.from_numpy(self.start.copy()))
        first = optimizer.param_groups[0]
        group = {"params": [self.param], "lr": first["lr"]}
        if "weight_decay" in first:
            group["weight_decay"] = first["weight_decay"]
        optimizer.add_param_group(group)

    def arm(self, sample_rate: float, generator) -> None:
        """Fix the canaries' Poisson rate (the plan's q) and the secret generator that samples them."""
        import torch

        self._rate, self._generator = float(sample_rate), generator
        self._offsets = None if self.canaries is None else torch.from_numpy(np.asarray(self.canaries.offsets, dtype=np.int64))
        self._values = None if self.canaries is None else torch.from_numpy(np.asarray(self.canaries.values, dtype=np.float32))

    def add_canaries(self, summed_grad) -> None:
        """One DP-SGD step: each canary joins the block's sum of clipped gradients with probability q
        (Poisson sampling, like a record), right before the step's noise. Both engines call this
        (Opacus through :meth:`install`, :class:`.per_sample.FunctionalDPSGD` directly)."""
        import torch

        self.steps += 1
        if self._offsets is not None and self._offsets.numel():
            take = torch.rand(self._offsets.numel(), generator=self._generator) < self._rate
            self.sampled += int(take.sum())
            summed_grad.index_add_(0, self._offsets[take], self._values[take])

    def install(self, dp_optimizer, sample_rate: float, generator, ghost: bool) -> None:
        """Wrap ``dp_optimizer``: the block gets its zero per-sample gradients before Opacus clips, and
        the sampled canaries are added to its clipped sum right before Opacus adds the noise."""
        import torch

        block = self.param
        self.arm(sample_rate, generator)
        pre_step, add_noise = dp_optimizer.pre_step, dp_optimizer.add_noise

        def zero_gradient(closure=None):
            # no record's gradient reaches the block: its per-sample gradients are zero
            if ghost:
                if block.grad is None:
                    block.grad = torch.zeros_like(block)
            elif getattr(block, "grad_sample", None) is None:
                others = [p.grad_sample for p in dp_optimizer.params if p is not block and getattr(p, "grad_sample", None) is not None]
                n = 0
                if others:
                    g = others[0]
                    n = sum(len(x) for x in g) if isinstance(g, list) else len(g)
                block.grad_sample = torch.zeros((n, *block.shape), dtype=block.dtype)
            return pre_step(closure)

        def canaries_then_noise():
            self.add_canaries(block.summed_grad)
            add_noise()

        dp_optimizer.pre_step = zero_gradient
        dp_optimizer.add_noise = canaries_then_noise


@dataclass(frozen=True)
class DPSGDSettings:
    """Per-sample clipping to ``max_grad_norm`` and Gaussian noise ``noise_multiplier * max_grad_norm``
    with Poisson sampling at ``sample_rate`` (= expected batch size / client dataset size).

    ``noise_multiplier`` is calibrated by :mod:`fedrlhf_secure.privacy` for the whole run, not
    per round: tasks must not create their own accountant.

    ``canaries`` / ``audit_block``: the audit canaries of a run with ``privacy.audit_canaries``
    (set by the client's privacy layer and the audit-block task wrapper; tasks pass the settings
    to :func:`make_private` unchanged and never look at them).

    ``per_sample`` (``privacy.per_sample``): which engine computes the clipped noisy gradients in a
    task that has both: ``direct`` (the default) or ``functorch`` (:mod:`.per_sample`, per-sample
    gradients from one backward pass or from ``torch.func.vmap(grad)``) or ``opacus``
    (:func:`make_private`, the reference they are tested against). The mechanism is the same; the
    ledger does not depend on it. Tasks with only Opacus (IMDb) ignore it.
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    per_sample: str = field(default="direct", compare=False)
    canaries: RecordCanaries | None = field(default=None, compare=False, repr=False)
    audit_block: AuditBlock | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class DPSGDReport:
    """What a task's DP-SGD fit actually did, checked by the client's privacy plan before the ledger
    commit: the settings it trained with and how many noisy steps it took.

    A task that was handed :class:`DPSGDSettings` must return one of these. Opacus' ``DPDataLoader``
    takes ``int(1/sample_rate)`` steps per epoch, which is one fewer than the batch count b for some
    b (93, 99, 105, ...: ``1/(1/b)`` rounds below b); the record-level plan plans exactly that
    many (:func:`.record_level.steps_per_epoch`), and the ledger records the steps reported here.
    """

    steps: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float

    @classmethod
    def of(cls, settings: DPSGDSettings, steps: int) -> DPSGDReport:
        return cls(int(steps), float(settings.sample_rate), float(settings.noise_multiplier), float(settings.max_grad_norm))


def make_private(module, optimizer, num_records: int, dp: DPSGDSettings, *, grad_sample_mode: str = "hooks", criterion=None):
    """Opacus DP-SGD wired the one way every task uses it; returns ``(module, optimizer, loader, criterion)``.

    * Poisson sampling by an Opacus ``DPDataLoader`` over record indices at exactly the planned
      ``sample_rate`` (``make_private``'s own loader conversion would round it to ``1/len(loader)``),
      hence ``poisson_sampling=False``; an empty batch still takes a noisy step.
    * Both the batches and the noise come from secret generators (:mod:`.randomness`), never from a
      seed: a seed published in ``config.yaml`` would let anyone regenerate and subtract the noise.
    * ``expected_batch_size`` is the planned ``sample_rate · n`` (Opacus divides the noisy sum by it).
    * ``grad_sample_mode="ghost"`` (Opacus' ghost clipping) also wraps ``criterion``; with ``"hooks"``
      the criterion comes back unchanged.

    Opacus' own accountant is never consulted: :mod:`fedrlhf_secure.privacy` accounts the steps the
    task reports in its :class:`DPSGDReport`.

    With ``dp.audit_block`` (``privacy.audit_canaries``) the block joins the optimizer and its
    canaries go in after clipping and before the noise of every step (:class:`AuditBlock`).
    """
    import warnings

    import torch
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import TensorDataset

    from .randomness import secret_torch_generator

    block = dp.audit_block
    loader = DPDataLoader(TensorDataset(torch.arange(num_records)), sample_rate=dp.sample_rate, generator=secret_torch_generator())
    ghost = grad_sample_mode == "ghost"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        warnings.filterwarnings("ignore", message=".*Optimal order.*")
        wrapped = PrivacyEngine().make_private(
            module=module,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            poisson_sampling=False,
            noise_generator=secret_torch_generator(),
            grad_sample_mode=grad_sample_mode,
            **({"criterion": criterion} if ghost else {}),
        )
    if ghost:
        private_module, private_optimizer, criterion, loader = wrapped
    else:
        private_module, private_optimizer, loader = wrapped
    private_optimizer.expected_batch_size = max(1, int(round(dp.sample_rate * num_records)))
    if block is not None:  # after make_private, which checks that the optimizer holds exactly the module's parameters
        block.attach(private_optimizer.original_optimizer)
        block.install(private_optimizer, dp.sample_rate, secret_torch_generator(), ghost)
    return private_module, private_optimizer, loader, criterion
