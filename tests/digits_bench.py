"""The digits yardstick for behavioural tests: train a defense briefly, measure clean and PGD accuracy.

Every defense's test compares itself with ``standard_digits_accuracy`` (conftest), a
standard-trained network of the same size under the same attack.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Optional

import lightning.pytorch as L
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lit_robust.attacks import PGD
from lit_robust.datamodules import DigitsDataModule
from lit_robust.defenses import PGDAT, AdversarialModule
from lit_robust.models import SmallCNN

EPS = 0.2  # Linf, in [0, 1] pixel units, as in configs/quickstart.yaml
#: Trainer accelerators for the fast-path tests: the CUDA cases run where a GPU is (benchmarks/gpu_check.sh)
ACCELERATORS = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def digits() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    return dm


def needs_index(name: str) -> bool:
    """Whether the registered defense ``name`` keeps per-example state, so its training batches must carry the
    examples' indices (``DigitsDataModule(with_index=True)``)."""
    from lit_robust.defenses import CERTIFIED_DEFENSES, DEFENSES

    return getattr({**DEFENSES, **CERTIFIED_DEFENSES}.get(name), "needs_example_index", False)


def digits_for(name: str, **kwargs) -> DigitsDataModule:
    """``DigitsDataModule(**kwargs)`` for the registered defense ``name``: with example indices where it needs them."""
    return DigitsDataModule(with_index=needs_index(name), **kwargs)


def data_per_defense(make: Callable[[bool], Any]) -> Callable[[str], Any]:
    """``get(name)``: the DataModule ``make(with_index)`` for the registered defense ``name``, built and set up once
    per value of ``with_index`` (:func:`needs_index`), for tests that run over the registry."""
    made = {}

    def get(name: str) -> Any:
        flag = needs_index(name)
        if flag not in made:
            made[flag] = make(flag)
            made[flag].setup()
        return made[flag]
    return get


def fit_on_digits(module: AdversarialModule, epochs: int = 8, callbacks: tuple = ()) -> AdversarialModule:
    """Trains on the digits train split (seed 0, CPU, no validation) and returns the module in eval mode.

    The classifier's layers are re-initialised from seed 0 first, so a result does not depend
    on how much of the RNG earlier tests or fixtures consumed.
    """
    L.seed_everything(0)
    for layer in module.model.modules():
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
    L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
              callbacks=list(callbacks)).fit(module, digits())
    return module.eval()


def digits_accuracy(model: torch.nn.Module) -> dict[str, float]:
    """Clean and PGD-20 (2 restarts, Linf 0.2) accuracy on the 359 test digits."""
    x, y = digits().splits["test"].tensors
    model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    robust = (PGD(EPS, steps=20, restarts=2).run(model, x, y).predictions == y).float().mean().item()
    return {"clean": clean, "pgd": robust}


def sgd(lr: float = 0.05):
    """The optimizer the digits tests use (paper recipes are for CIFAR-scale networks)."""
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)


def quiet_trainer(tmp_path, **kwargs) -> L.Trainer:
    """A CPU Trainer with no logger, checkpoints, progress bar or summary unless asked for."""
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    return L.Trainer(**{**defaults, **kwargs})


def training_only_trainer(tmp_path, **kwargs) -> L.Trainer:
    """``quiet_trainer`` without validation unless asked for."""
    return quiet_trainer(tmp_path, **{"limit_val_batches": 0, **kwargs})


class RecordingPGDAT(PGDAT):
    """A small PGD-AT (4 steps of eps/4) that records its training attack's settings at every step."""

    def __init__(self, **kwargs):
        super().__init__(SmallCNN(width=4), eps=EPS, steps=4, step_size=EPS / 4, optimizer=sgd(), **kwargs)
        self.seen = []

    def training_step(self, batch, batch_idx):
        a = self.attack
        self.seen.append((self.current_epoch, batch_idx, a.eps, a.step_size, a.steps, a.fosc_threshold))
        return super().training_step(batch, batch_idx)


class InferenceModeSeen(L.Callback):
    """Records, per validation/test batch, whether inference mode was on (Lightning's default there)."""

    def __init__(self):
        self.flags = []

    def on_test_batch_start(self, *args):
        self.flags.append(torch.is_inference_mode_enabled())

    on_validation_batch_start = on_test_batch_start


def tiny_defense(name: str, **kwargs) -> AdversarialModule:
    """A registered defense (``DEFENSES`` or ``CERTIFIED_DEFENSES``) at digits scale: SmallCNN(width=4),
    or CNN3 for the bound-based ones, with two-step attacks and two PGPE pairs."""
    from lit_robust.defenses import CERTIFIED_DEFENSES, DEFENSES, CertifiedTraining
    from lit_robust.models import CNN3, DIGITS_MEAN, DIGITS_STD

    if issubclass(CERTIFIED_DEFENSES.get(name, object), CertifiedTraining):  # bound propagation: a CNN3
        extra = {"estimator": "pgpe", "pairs": 2} if name == "GaussianLossSmoothing" else {}
        net = CNN3(in_channels=1, input_size=8, mean=DIGITS_MEAN, std=DIGITS_STD)
        return CERTIFIED_DEFENSES[name](net, eps=0.1, eps_ramp_epochs=1, **extra, **kwargs)
    if name in CERTIFIED_DEFENSES:
        return CERTIFIED_DEFENSES[name](SmallCNN(width=4), sigma=0.25, **kwargs)
    return DEFENSES[name](SmallCNN(width=4), eps=EPS, steps=2, step_size=0.1, **kwargs)


class OpLog(TorchDispatchMode):
    """Counts the aten ops run while active (backward passes included), keyed by ``name_of(func, args)``
    (default ``str(func)``, e.g. ``aten._local_scalar_dense.default``); ops it names ``None`` are not counted."""

    def __init__(self, name_of: Optional[Callable] = None) -> None:
        super().__init__()
        self.counts: Counter = Counter()
        self.name_of = name_of or (lambda func, args: str(func))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = self.name_of(func, args)
        if name is not None:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


class AttackSideEffects:
    """Sets a ``SmallCNN`` to train mode with one BatchNorm the user froze on purpose (``features[4]``) and
    remembers what an attack must leave as it found: every submodule's flag and ``features[1]``'s running mean."""

    def __init__(self, net: torch.nn.Module) -> None:
        net.train()
        net.features[4].eval()
        self.net = net
        self.flags, self.stats = self._flags(), net.features[1].running_mean.clone()

    def _flags(self) -> dict[str, bool]:
        return {name: m.training for name, m in self.net.named_modules()}

    def flags_restored(self) -> bool:
        return self._flags() == self.flags

    def assert_untouched(self) -> None:
        """Flags restored, running statistics unchanged, no parameter gradient left."""
        assert self.flags_restored()
        assert torch.equal(self.net.features[1].running_mean, self.stats)
        assert all(p.grad is None for p in self.net.parameters())
