"""The pieces the ImageNet recipes add: the per-batch piecewise-linear learning rate (Fast AT's), AdamW without decay
on 1-D tensors (Singh et al.'s, Debenedetti et al.'s), and loading a local timm checkpoint when fit starts."""

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback

from digits_bench import quiet_trainer

from lit_robust.callbacks.piecewise_lr import PiecewiseLinearLR
from lit_robust.defenses import PGDAT
from lit_robust.models import SmallCNN
from lit_robust.optim.adamw import AdamWNoNormBiasDecay

KNOTS, VALUES = [0, 1, 6, 12, 15], [0.0, 0.4, 0.04, 0.004, 0.0004]


class LrSeen(Callback):
    """The learning rate of every batch, read after the callbacks before it in the list ran."""

    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])


def constant_lr(optimizer):
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)


def test_piecewise_lr_sets_the_official_lr_before_every_batch(tmp_path, digits):
    """Fast AT's ``np.interp(epoch + (i + 1) / len(loader), lr_epochs, lr_values)`` for each batch, every group."""
    seen = LrSeen()
    module = PGDAT(SmallCNN(width=4), eps=0.1, steps=1, lr_scheduler=constant_lr,
                   optimizer=lambda p: AdamWNoNormBiasDecay(p, lr=1.0))
    trainer = quiet_trainer(tmp_path, max_epochs=2, limit_train_batches=3, limit_val_batches=0,
                            callbacks=[PiecewiseLinearLR(KNOTS, VALUES), seen])
    trainer.fit(module, digits)
    expected = [np.interp(e + (i + 1) / 3, KNOTS, VALUES) for e in range(2) for i in range(3)]
    assert len(seen.lrs) == 6 and all(len(set(group)) == 1 for group in seen.lrs)
    assert [group[0] for group in seen.lrs] == pytest.approx(expected)
    assert expected[-1] == pytest.approx(0.4 - 0.36 * 1 / 5)  # epoch 2 of the 0.4 -> 0.04 ramp


@pytest.mark.parametrize("milestones,lrs", [([0], [0.1]), ([0, 2, 1], [0, 1, 2]), ([0, 1], [0.1, -1.0]),
                                            ([0, 1], [0.1])])
def test_piecewise_lr_rejects_bad_knots(milestones, lrs):
    with pytest.raises(ValueError, match="milestones|lrs"):
        PiecewiseLinearLR(milestones, lrs)


def test_adamw_exempts_one_dimensional_tensors_from_decay():
    """With zero gradients AdamW moves only through its decoupled decay: weights shrink by lr * wd, and the BatchNorm
    scales/offsets and biases (ndim <= 1) stay as they are."""
    net = SmallCNN(width=4)
    optimizer = AdamWNoNormBiasDecay(net.parameters(), lr=0.1, betas=(0.9, 0.95), weight_decay=0.5)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in net.named_parameters():
        factor = 1.0 if p.ndim <= 1 else 1 - 0.1 * 0.5
        torch.testing.assert_close(p.detach(), before[name] * factor)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.5, 0.0]
    assert all(g["betas"] == (0.9, 0.95) for g in optimizer.param_groups)


def test_timm_weights_are_loaded_when_fit_starts(tmp_path, digits):
    pytest.importorskip("timm")
    from lit_robust.callbacks.timm_weights import TimmPretrainedWeights
    from lit_robust.models import DIGITS_MEAN, DIGITS_STD, TimmClassifier

    def net():
        return TimmClassifier("test_vit", num_classes=10, in_chans=1, mean=DIGITS_MEAN, std=DIGITS_STD, img_size=8,
                              patch_size=4)

    source = net()
    torch.save({"state_dict_ema": source.model.state_dict()}, tmp_path / "ema.pth")
    module = PGDAT(net(), eps=0.1, steps=1, optimizer=lambda p: torch.optim.SGD(p, lr=0.0), lr_scheduler=constant_lr)
    assert not torch.equal(module.model.model.head.weight, source.model.head.weight)
    quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0,
                  callbacks=[TimmPretrainedWeights(str(tmp_path / "ema.pth"), "state_dict_ema")]).fit(module, digits)
    assert all(torch.equal(a, b) for a, b in zip(module.model.model.parameters(), source.model.parameters()))

    other = PGDAT(SmallCNN(width=4), eps=0.1, steps=1)
    with pytest.raises(TypeError, match="TimmClassifier"):
        quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0,
                      callbacks=[TimmPretrainedWeights(str(tmp_path / "ema.pth"))]).fit(other, digits)
