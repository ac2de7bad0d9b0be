"""No host synchronisation inside ``training_step``: every defense's step is recorded under a
TorchFunctionMode that sees each tensor-to-Python conversion (``.item()``, ``bool(t)``, ``int(t)``,
``float(t)``, ``.tolist()``, ``.numpy()``, ``.cpu()``), the calls that stall a GPU's queue.

The first batch of an epoch is exempt (the one [0, 1] input check per epoch is such a sync, by design);
so is what Lightning does between steps (the non-finite-loss check at logging intervals).
"""

import os
import sys

import lightning.pytorch as L
import pytest
import torch
from digits_bench import ACCELERATORS, digits_for, tiny_defense, training_only_trainer
from torch.overrides import TorchFunctionMode

from lit_robust.datamodules import DigitsDataModule
from lit_robust.callbacks import (EMA, AttackStepsSchedule, CatastrophicOverfittingMonitor, EpsilonSchedule,
                                  FOSCSchedule)
from lit_robust.defenses import CERTIFIED_DEFENSES, DEFENSES

TORCH_OPTIM = os.path.join("torch", "optim")
#: ops whose output size depends on tensor values: the host waits for them to learn it
SHAPE_SYNCS = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive"}
SYNCS = {"item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy", "cpu"}


class HostSyncRecorder(TorchFunctionMode):
    """Records the name of every tensor-to-host conversion run inside the ``with`` block, and every tensor made
    from Python data on an explicit device (``torch.tensor(0.5, device=...)``: on a GPU a copy that waits for
    the queue; Lightning's ``self.log`` of a Python number makes one).

    Except in ``torch.optim``'s own code: it keeps an optimizer's step counters on the CPU (unless the optimizer
    is ``capturable`` or ``fused``), so making them (``torch.tensor(0.0, device="cpu")``) and reading them
    (``.item()``, for every parameter in Adam's step) does not wait for a GPU.
    """

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if _in_torch_optim(sys._getframe(1)):
            pass
        elif name in SYNCS or name in SHAPE_SYNCS:
            self.seen.append(name)
        elif name == "__getitem__" and any(_is_mask(i) for i in _indices(args[1])):
            self.seen.append("__getitem__(mask)")  # the result's size depends on the mask's values
        elif func in (torch.tensor, torch.as_tensor) and (kwargs or {}).get("device") is not None:
            self.seen.append(f"{name}(device=...)")  # Python data copied to the device: a blocking copy on a GPU
        return func(*args, **(kwargs or {}))


def _indices(index) -> tuple:
    return index if isinstance(index, tuple) else (index,)


def _is_mask(index) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype == torch.bool


def _in_torch_optim(caller) -> bool:
    return os.path.dirname(caller.f_code.co_filename).endswith(TORCH_OPTIM)


def test_the_recorder_sees_the_usual_syncs():
    x = torch.rand(4)
    with HostSyncRecorder() as recorder:
        x.sum().item()
        if x.max() > 2:
            pass
        int(x.argmax()), float(x[0]), x.tolist()
        torch.where(x > 0.5, x, 0.0).sum()  # a mask: no sync
        torch.tensor(0.5, device=x.device), torch.tensor(0.5)  # to the model's device, and a CPU scalar
        x[x > 0.5], x[:, None][x > 0.5, 0], x[1:], x[torch.tensor([0, 2])], (x > 0.5).nonzero()
    assert recorder.seen == ["item", "__bool__", "__int__", "__float__", "tolist", "tensor(device=...)",
                             "__getitem__(mask)", "__getitem__(mask)", "nonzero"]


def test_the_recorder_lets_an_optimizer_read_its_cpu_step_counter():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.Adam([weight], foreach=False)  # the single-tensor path reads the counter per parameter
    weight.grad = torch.ones(3)
    with HostSyncRecorder() as recorder:
        optimizer.step()
        weight.sum().item()
    assert optimizer.state[weight]["step"].device.type == "cpu" and recorder.seen == ["item"]


CASES = [*DEFENSES, *CERTIFIED_DEFENSES, "PGDAT+awp", "PGDAT+fosc"]


@pytest.mark.parametrize("accelerator", ACCELERATORS)
@pytest.mark.parametrize("case", CASES)
def test_training_step_does_not_sync_with_the_host(tmp_path, case, accelerator):
    """On a GPU torch's own detector is on too (``set_sync_debug_mode("error")``): any CUDA call that waits
    for the device inside the step raises."""
    name, _, variant = case.partition("+")
    module = tiny_defense(name, awp_gamma=0.01) if variant == "awp" else tiny_defense(name)
    callbacks = [FOSCSchedule(c_max=0.5, dynamic_epochs=2)] if variant == "fosc" else []
    seen = []
    module.training_step = recorded(module.training_step, accelerator, seen)
    data = digits_for(name, batch_size=16)
    training_only_trainer(tmp_path, max_epochs=1, limit_train_batches=3, log_every_n_steps=1,
                          callbacks=callbacks, accelerator=accelerator).fit(module, data)
    assert len(seen) == 2 and seen == [[], []], seen


def recorded(step, accelerator: str, seen: list):
    """``step(..., batch_idx, ...)`` recording its host syncs into ``seen`` (batch 0 exempt); on a GPU also under
    torch's detector, which raises at any CUDA call that waits for the device."""
    def run(*args):
        batch_idx = args[-1]
        if batch_idx == 0:
            return step(*args)
        if accelerator == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            with HostSyncRecorder() as recorder:
                out = step(*args)
        finally:
            if accelerator == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        seen.append(recorder.seen)
        return out

    return run


def _loop_syncs(tmp_path, steps, callbacks=(), name="PGDAT"):
    module = tiny_defense(name)
    trainer = training_only_trainer(tmp_path, max_steps=steps, enable_progress_bar=True, log_every_n_steps=1000,
                                    callbacks=list(callbacks))
    data = digits_for(name, batch_size=16)
    with HostSyncRecorder() as recorder:
        trainer.fit(module, data)
    return len(recorder.seen)


@pytest.mark.parametrize("name", [*DEFENSES, *CERTIFIED_DEFENSES])
def test_the_whole_training_loop_has_no_per_step_sync(tmp_path, name):
    """Lightning's loop included (automatic or manual optimization), progress bar on: 30 steps sync as often
    as 10 (once per epoch, not per step). A metric on the progress bar is read, and synced, at every refresh:
    train/loss is not on it."""
    assert _loop_syncs(tmp_path, 30, name=name) == _loop_syncs(tmp_path, 10, name=name) > 0


PER_STEP_CALLBACKS = {
    "EMA": lambda: EMA(decay=0.9),  # torch's AveragedModel asks n_averaged == 0 and > 0 on the host per update
    "EpsilonSchedule": lambda: EpsilonSchedule(ramp_epochs=1, per_step=True),
    "AttackStepsSchedule": lambda: AttackStepsSchedule(ramp_epochs=1, per_step=True),
    "FOSCSchedule": lambda: FOSCSchedule(c_max=0.5, dynamic_epochs=2),
    "CatastrophicOverfittingMonitor": lambda: CatastrophicOverfittingMonitor(),
}


@pytest.mark.parametrize("callback", list(PER_STEP_CALLBACKS))
def test_callbacks_add_no_per_step_sync(tmp_path, callback):
    make = PER_STEP_CALLBACKS[callback]
    assert _loop_syncs(tmp_path, 30, [make()]) == _loop_syncs(tmp_path, 10, [make()])


class _OpenSyncWindow(L.Callback):
    """First in the callback list: from each batch's start but the first's, torch's CUDA detector raises."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx > 0:
            torch.cuda.set_sync_debug_mode("error")

    def on_exception(self, trainer, pl_module, exception):
        torch.cuda.set_sync_debug_mode("default")


class _CloseSyncWindow(L.Callback):
    """Last in the list: the window closes after every callback's batch end (the module's own check follows)."""

    def __init__(self):
        self.batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.cuda.set_sync_debug_mode("default")
        self.batches += 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["PGDAT", "FreeAT", "CertifiedTraining", *PER_STEP_CALLBACKS])
def test_cuda_batches_run_without_waiting_for_the_device(tmp_path, name):
    """On a GPU, the whole batch (the callbacks' per-step hooks, training step, backward, optimizer step) under
    torch's detector: any CUDA call that waits for the device raises."""
    callbacks = [PER_STEP_CALLBACKS[name]()] if name in PER_STEP_CALLBACKS else []
    module = tiny_defense("PGDAT" if name in PER_STEP_CALLBACKS else name)
    close = _CloseSyncWindow()
    trainer = training_only_trainer(tmp_path, max_epochs=1, limit_train_batches=5, accelerator="cuda",
                                    callbacks=[_OpenSyncWindow(), *callbacks, close])
    trainer.fit(module, DigitsDataModule(batch_size=16))
    assert close.batches == 5


@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_the_adversarial_training_callback_does_not_sync_with_the_host(tmp_path, accelerator):
    """A module that is not ours: the callback's part of each step (input check aside, first batch), a FOSC-stopped
    PGD on a seeded half of the batch with its logging, is recorded (and, on a GPU, under torch's detector)."""
    from helpers.foreign_module import DictDigits, ForeignClassifier

    from lit_robust.attacks import PGD
    from lit_robust.callbacks import AdversarialTraining

    callback = AdversarialTraining(PGD(0.2, 3, 0.1, fosc_threshold=0.05), inputs="image", targets="label", fraction=0.5)
    seen = []
    callback.adversarial_batch = recorded(callback.adversarial_batch, accelerator, seen)
    training_only_trainer(tmp_path, max_epochs=1, limit_train_batches=3, callbacks=[callback],
                          accelerator=accelerator).fit(ForeignClassifier(width=4), DictDigits(batch_size=16))
    assert seen == [[], []], seen
