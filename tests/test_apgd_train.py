"""APGDTrain (Singh, Croce & Hein 2023) against a transliteration of the official ``apgd_train`` (Linf, CE, no random
start) on identical tensors, and PGDAT(attack="apgd") training on the digits."""

import math

import pytest
import torch
import torch.nn.functional as F
from digits_bench import EPS, digits_accuracy, fit_on_digits, sgd
from torch import nn

from lit_robust.attacks import APGDTrain
from lit_robust.defenses import PGDAT
from lit_robust.models import SmallCNN


def _official_apgd_train(model, x, y, eps, n_iter):
    """github.com/nmndeep/revisiting-at autopgd_train_clean.py apgd_train, the Linf / CE path, written out."""
    x_adv = x.clone().clamp(0.0, 1.0)
    x_best = x_adv.clone()
    loss_steps = torch.zeros([n_iter, x.shape[0]])
    n_iter_2, n_iter_min, size_decr = max(int(0.22 * n_iter), 1), max(int(0.06 * n_iter), 1), max(
        int(0.03 * n_iter), 1)
    k = n_iter_2
    step_size = 2.0 * eps * torch.ones([x.shape[0], 1, 1, 1])
    counter3 = 0
    x_adv.requires_grad_()
    loss_indiv = F.cross_entropy(model(x_adv), y, reduction="none")
    grad = torch.autograd.grad(loss_indiv.sum(), [x_adv])[0].detach()
    grad_best = grad.clone()
    x_adv = x_adv.detach()
    loss_best = loss_indiv.detach().clone()
    loss_best_last_check, reduced_last_check = loss_best.clone(), torch.ones_like(loss_best)
    x_adv_old = x_adv.clone()
    for i in range(n_iter):
        grad2 = x_adv - x_adv_old
        x_adv_old = x_adv.clone()
        a = 0.75 if i > 0 else 1.0
        x_adv_1 = torch.clamp(torch.min(torch.max(x_adv + step_size * torch.sign(grad), x - eps), x + eps), 0.0, 1.0)
        x_adv_1 = torch.clamp(torch.min(torch.max(x_adv + (x_adv_1 - x_adv) * a + grad2 * (1 - a), x - eps),
                                        x + eps), 0.0, 1.0)
        x_adv = x_adv_1 + 0.0
        if i < n_iter - 1:
            x_adv.requires_grad_()
        loss_indiv = F.cross_entropy(model(x_adv), y, reduction="none")
        if i < n_iter - 1:
            grad = torch.autograd.grad(loss_indiv.sum(), [x_adv])[0].detach()
        x_adv = x_adv.detach()
        y1 = loss_indiv.detach().clone()
        loss_steps[i] = y1 + 0
        ind = (y1 > loss_best).nonzero().squeeze()
        x_best[ind] = x_adv[ind].clone()
        grad_best[ind] = grad[ind].clone()
        loss_best[ind] = y1[ind] + 0
        counter3 += 1
        if counter3 == k:
            t = torch.zeros(x.shape[0])
            for c in range(k):
                t += (loss_steps[i - c] > loss_steps[i - c - 1]).float()
            fl_oscillation = (t <= k * 0.75 * torch.ones_like(t)).float()
            fl_reduce_no_impr = (1.0 - reduced_last_check) * (loss_best_last_check >= loss_best).float()
            fl_oscillation = torch.max(fl_oscillation, fl_reduce_no_impr)
            reduced_last_check = fl_oscillation.clone()
            loss_best_last_check = loss_best.clone()
            if fl_oscillation.sum() > 0:
                ind_fl_osc = (fl_oscillation > 0).nonzero().squeeze()
                step_size[ind_fl_osc] /= 2.0
                x_adv[ind_fl_osc] = x_best[ind_fl_osc].clone()
                grad[ind_fl_osc] = grad_best[ind_fl_osc].clone()
            counter3 = 0
            k = max(k - size_decr, n_iter_min)
    return x_best


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()


@pytest.mark.parametrize("n_iter", [1, 2, 10, 25])
def test_equals_the_official_apgd_train_on_identical_tensors(n_iter):
    """2 iterations is the paper's training attack; 10 and 25 exercise the step halving at the checkpoints."""
    g = torch.Generator().manual_seed(1)
    x, y, eps = torch.rand(32, 3, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g), 8 / 255
    model = _net()
    expected = _official_apgd_train(model, x, y, eps, n_iter)
    got = APGDTrain(eps, steps=n_iter)(model, x, y)
    assert torch.equal(got, expected)
    assert (got - x).abs().max() <= eps + 1e-6 and got.min() >= 0 and got.max() <= 1
    loss = lambda z: F.cross_entropy(model(z), y, reduction="none")  # noqa: E731
    with torch.no_grad():
        assert (loss(got) >= loss(x)).all()  # the best point: never worse than the clean image
        if n_iter >= 10:  # some examples had their step halved and moved on from the best point
            assert not torch.equal(got, APGDTrain(eps, steps=n_iter - 1)(model, x, y))


def test_counts_and_refusals():
    calls = {"forward": 0}
    model = _net()
    model.register_forward_hook(lambda *a: calls.__setitem__("forward", calls["forward"] + 1))
    APGDTrain(8 / 255, steps=2)(model, torch.rand(4, 3, 8, 8), torch.arange(4))
    assert calls["forward"] == 3  # 2 iterations: 3 forwards (the last without a backward)
    assert math.isclose(APGDTrain(4 / 255).step_size, 8 / 255)
    with pytest.raises(ValueError, match="Linf only"):
        APGDTrain(0.5, norm="l2")
    with pytest.raises(ValueError, match="attack must be"):
        PGDAT(SmallCNN(width=4), attack="fgsm")


def test_pgdat_with_apgd_trains_robustness_on_digits():
    """PGDAT(attack="apgd", steps=2) at Linf 0.2: far above standard training's ~0 PGD-20 accuracy."""
    module = fit_on_digits(PGDAT(SmallCNN(width=16), eps=EPS, steps=2, attack="apgd", optimizer=sgd()))
    assert isinstance(module.attack, APGDTrain) and module.step_size == pytest.approx(2 * EPS)
    acc = digits_accuracy(module.model)
    assert acc["clean"] > 0.85 and acc["pgd"] > 0.4, acc
