"""ZeroGrad and MultiGrad (Golgooni et al. 2023): the gradient masks against the official formulas, and the
catastrophic-overfitting comparison with plain FGSM on the digits. ATAS is tested in tests/test_atas.py."""

import pytest
import torch
from digits_bench import digits, fit_on_digits
from torch import nn

from lit_robust.attacks import PGD
from lit_robust.callbacks.catastrophic_overfitting import CatastrophicOverfittingMonitor
from lit_robust.defenses import DEFENSES
from lit_robust.defenses.zerograd import (MultiGrad, ZeroGrad, multigrad_direction, row_quantile,
                                          zerograd_gradient)
from lit_robust.models import SmallCNN


def test_registered_with_official_defaults():
    assert DEFENSES["ZeroGrad"] is ZeroGrad and DEFENSES["MultiGrad"] is MultiGrad
    z, m = ZeroGrad(SmallCNN(width=4)), MultiGrad(SmallCNN(width=4))
    assert z.q == 0.4 and z.step_size == pytest.approx(16 / 255) and m.step_size == pytest.approx(16 / 255)
    assert m.samples == 3 and m.agree is None
    for bad in (dict(q=1.5), dict(norm="l2")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ZeroGrad(SmallCNN(width=4), **bad)
    with pytest.raises(ValueError, match="agree"):
        MultiGrad(SmallCNN(width=4), samples=3, agree=1)


def test_row_quantile_is_torch_quantile():
    v = torch.randn(7, 193).abs()
    for q in (0.0, 0.4, 0.55, 1.0):
        assert torch.allclose(row_quantile(v, q), torch.quantile(v, q, dim=1))


def test_zerograd_zeroes_exactly_the_q_quantile_per_example():
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(4, 1, 10, 10, generator=g) * torch.tensor([1.0, 10.0, 0.01, 3.0]).view(4, 1, 1, 1)
    out = zerograd_gradient(grad, 0.4)
    for i in range(4):
        thr = torch.quantile(grad[i].abs().flatten(), 0.4)
        kept = grad[i].abs() >= thr
        assert torch.equal(out[i][kept], grad[i][kept]) and (out[i][~kept] == 0).all()
        assert (out[i] == 0).sum() == 40  # 100 distinct values: exactly 40% zeroed, whatever the scale
    assert (zerograd_gradient(grad, 0.0) == grad).all()


def test_zerograd_step_keeps_the_random_start_where_zeroed():
    """x_adv = x + Proj(delta0 + alpha * sign(masked g)): zeroed pixels stay at the start, the others move."""
    net = SmallCNN(width=4).eval()
    x, y = torch.full((8, 1, 8, 8), 0.5), torch.arange(8)
    module = ZeroGrad(net, eps=0.2, step_size=0.1, q=0.5)
    torch.manual_seed(1)
    delta0 = torch.empty_like(x).uniform_(-0.2, 0.2)
    torch.manual_seed(1)
    x_adv = module.perturb(x, y)
    d = delta0.requires_grad_()
    (grad,) = torch.autograd.grad(nn.functional.cross_entropy(net(x + d), y, reduction="sum"), d)
    expected = (delta0 + 0.1 * zerograd_gradient(grad, 0.5).sign()).clamp(-0.2, 0.2)
    assert torch.allclose(x_adv - x, expected.detach(), atol=1e-6)
    assert module.in_threat_model(x, x_adv).all() and all(p.grad is None for p in net.parameters())


def test_multigrad_zeroes_disagreeing_signs():
    grads = torch.tensor([[[1.0, -2.0, 3.0, 0.5, -1.0]],
                          [[2.0, -0.1, -3.0, 0.7, -4.0]],
                          [[0.3, -5.0, 1.0, -0.2, -0.1]]])  # [k=3, B=1, 5]
    assert multigrad_direction(grads).tolist() == [[3.0, -3.0, 0.0, 0.0, -3.0]]  # all three must agree
    assert multigrad_direction(grads, agree=2).tolist() == [[3.0, -3.0, 1.0, 1.0, -3.0]]  # official --c-th 2


def test_multigrad_step_is_from_the_clean_input():
    net = SmallCNN(width=4).eval()
    x, y = torch.full((6, 1, 8, 8), 0.5), torch.arange(6)
    x_adv = MultiGrad(net, eps=0.2).perturb(x, y)
    d = (x_adv - x).abs()
    assert ((d - 0.2).abs() < 1e-6) .logical_or(d == 0).all()  # +-eps where all agree (alpha = 2 eps), else 0
    assert (d == 0).any() and (d > 0).any()


def _pgd_accuracy(model, eps):
    x, y = digits().splits["test"].tensors
    model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    return clean, (PGD(eps, steps=20, restarts=2).run(model, x, y).predictions == y).float().mean().item()


@pytest.mark.parametrize("cls, floor", [(ZeroGrad, 0.2), (MultiGrad, 0.3)])
def test_keeps_pgd_accuracy_on_digits_without_a_collapse(cls, floor):
    """The 8x8 digits cannot show catastrophic overfitting (the 16x16 ones can: tests/test_single_step_collapse.py,
    where ZeroGrad and MultiGrad are tested against a collapsing FGSM): plain FGSM (no random start, step eps) at eps 0.2, 0.25
    and 0.3, 15 and 40 epochs, SGD lr 0.05, SmallCNN(width=8), never tripped the monitor (measured while writing
    this test). What is asserted: trained with the monitor watching, ZeroGrad and MultiGrad reach a PGD-20 accuracy
    far above an undefended net's (about 0 at eps 0.2) and the monitor flags no epoch."""
    monitor = CatastrophicOverfittingMonitor(drop=0.2, restore=False, stop=False)
    module = cls(SmallCNN(width=8), eps=0.2, optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9,
                                                                                weight_decay=5e-4),
                 lr_scheduler=lambda o: torch.optim.lr_scheduler.ConstantLR(o, factor=1.0))
    fit_on_digits(module, epochs=15, callbacks=(monitor,))
    clean, robust = _pgd_accuracy(module.model, 0.2)
    assert monitor.collapsed_epochs == []
    assert clean > 0.8 and robust > floor, (clean, robust)
