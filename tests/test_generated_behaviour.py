"""Behavioural check of the generated-data path: a small real training set plus extra images served through
``GeneratedDataModule`` gives higher robust accuracy than the small real set alone, under the same evaluation."""

import lightning.pytorch as L
import numpy as np
import torch

from digits_bench import EPS, digits_accuracy, sgd

from lit_robust.datamodules import DigitsDataModule, GeneratedDataModule
from lit_robust.defenses import PGDAT
from lit_robust.models import SmallCNN

KEEP = 150  # real training images; the other 1,108 training digits are served as "generated"
STEPS = 400


class FewDigits(DigitsDataModule):
    """The digits with only the first ``KEEP`` training images; the rest are kept aside in ``extra``."""

    def split_arrays(self):
        arrays = super().split_arrays()
        images, labels = arrays["train"]
        self.extra = images[KEEP:], labels[KEEP:]
        arrays["train"] = images[:KEEP], labels[:KEEP]
        return arrays


def _fit(datamodule):
    L.seed_everything(0)
    module = PGDAT(SmallCNN(width=16), eps=EPS, steps=5, step_size=EPS / 4, optimizer=sgd(),
                   lr_scheduler=lambda opt: torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0))
    L.Trainer(accelerator="cpu", max_steps=STEPS, max_epochs=-1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0).fit(module, datamodule)
    return digits_accuracy(module.model)


def test_extra_images_through_the_generated_path_make_the_model_more_robust(tmp_path):
    real = FewDigits(batch_size=32)
    real.setup()
    images, labels = real.extra
    path = tmp_path / "extra.npz"
    np.savez(path, image=images.permute(0, 2, 3, 1).numpy(), label=labels.numpy())

    small = _fit(FewDigits(batch_size=32))
    mixed = _fit(GeneratedDataModule(FewDigits(batch_size=32), str(path), real_fraction=0.3))

    # the same evaluation (PGD-20, 2 restarts, on the 359 test digits), the same number of steps
    assert mixed["pgd"] > small["pgd"] + 0.05, (small, mixed)
    assert mixed["clean"] > small["clean"], (small, mixed)
