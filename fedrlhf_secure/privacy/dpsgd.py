"""Record-level DP-SGD settings handed to a task's local training (Opacus does the work)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DPSGDSettings:
    """Per-sample clipping to ``max_grad_norm`` and Gaussian noise ``noise_multiplier * max_grad_norm``
    with Poisson sampling at ``sample_rate`` (= expected batch size / client dataset size).

    ``noise_multiplier`` is calibrated by :mod:`fedrlhf_secure.privacy` for the whole run, not
    per round: tasks must not create their own accountant.
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float


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
    """
    import warnings

    import torch
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import TensorDataset

    from .randomness import secret_torch_generator

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
    return private_module, private_optimizer, loader, criterion
