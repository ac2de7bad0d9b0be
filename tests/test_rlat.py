"""RLAT (Kireev et al., UAI 2022): the official per-layer budgets, the normalised-gradient step of each layer
against a hand-computed gradient, hooks and modes left as found, and robustness to noise on the digits."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from digits_bench import digits, fit_on_digits, sgd

from lit_robust.attacks import PGD
from lit_robust.defenses import RLAT, StandardTraining
from lit_robust.defenses.rlat import default_rlat_layers, rlat_budgets, rlat_perturbation
from lit_robust.models import PreActResNet18, SmallCNN


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))


def _batch(n=5, shape=(1, 2, 3), classes=3):
    g = torch.Generator().manual_seed(1)
    return 0.1 + 0.8 * torch.rand(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def _norms(t):
    return t.flatten(1).norm(dim=1)


def test_budgets_are_the_official_formula_for_preact_resnet18():
    model = PreActResNet18()
    assert default_rlat_layers(model) == ["features.0", "features.2", "features.4", "features.6", "features.8"]
    x, y = 0.1 + 0.8 * torch.rand(2, 3, 32, 32), torch.tensor([1, 7])  # inside the box: no clamp
    x_adv, deltas = rlat_perturbation(model, x, y, [model.get_submodule(n) for n in default_rlat_layers(model)], 0.08)
    # official: eps / 3072 * numel_per_example / (i + 1) for [input, conv1, layer1, layer2, layer3, layer4]
    numels = [3072, 64 * 32 * 32, 64 * 32 * 32, 128 * 16 * 16, 256 * 8 * 8, 512 * 4 * 4]
    expected = [0.08 / 3072 * n / (i + 1) for i, n in enumerate(numels)]
    assert [d.shape[1:].numel() for d in deltas] == numels[1:]
    torch.testing.assert_close(_norms(x_adv - x), torch.full((2,), expected[0]), rtol=1e-4, atol=1e-6)
    for d, eps_l in zip(deltas, expected[1:]):
        torch.testing.assert_close(_norms(d), torch.full((2,), eps_l), rtol=1e-4, atol=1e-6)
    # the other official rules
    shapes = [(3, 32, 32), (64, 32, 32), (128, 16, 16)]
    assert rlat_budgets(0.1, (3, 32, 32), shapes, "lpips", "none") == pytest.approx([0.1, 0.1, 0.4])
    assert rlat_budgets(0.1, (3, 32, 32), shapes, "constant", "ascending") == pytest.approx([0.1, 0.2, 0.3])
    assert rlat_budgets(0.1, (3, 32, 32), shapes, "constant", "lindescending") == pytest.approx([0.1, 0.2 / 3, 0.1 / 3])


def test_each_layer_moves_eps_l_along_the_hand_computed_gradient():
    model, (x, y) = _tiny(), _batch()
    eps = 0.3
    x_adv, (d1,) = rlat_perturbation(model, x, y, [model[1]], eps, bn_mode="eval")
    # by hand: h = W1 x + b1, logits = W2 tanh(h) + b2, mean CE over the batch
    W1, b1, W2, b2 = model[1].weight, model[1].bias, model[3].weight, model[3].bias
    with torch.no_grad():
        h = x.flatten(1) @ W1.T + b1
        p = F.softmax(torch.tanh(h) @ W2.T + b2, 1)
        g_logits = (p - F.one_hot(y, 3)) / len(y)
        g1 = (g_logits @ W2) * (1 - torch.tanh(h) ** 2)
        g0 = (g1 @ W1).view_as(x)
    budgets = [eps, eps * 4 / 6 / 2]  # scaling (numel 6 and 4), descending
    for delta, g, eps_l in ((x_adv - x, g0, budgets[0]), (d1, g1, budgets[1])):
        torch.testing.assert_close(_norms(delta), torch.full((len(y),), eps_l), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(delta.flatten(1), eps_l * F.normalize(g.flatten(1), dim=1), rtol=1e-4, atol=1e-6)
    # Linf: eps_l * sign(g), clamped to [-eps, eps]
    x_inf, (d_inf,) = rlat_perturbation(model, x, y, [model[1]], eps, norm="linf", eps_policy="constant",
                                        grow_policy="ascending", bn_mode="eval")
    torch.testing.assert_close(x_inf, (x + eps * g0.sign()).clamp(0, 1))  # the input stays in the box
    torch.testing.assert_close(d_inf, (2 * eps * g1.sign()).clamp(-eps, eps))


def test_training_loss_is_the_perturbed_forward_and_hooks_modes_and_grads_are_left_as_found():
    net = SmallCNN(width=4)
    module = RLAT(net, eps=0.5)
    x, y = next(iter(digits().train_dataloader()))
    module.train()
    net.features[1].eval()  # a flag the user set: kept
    running = net.features[1].running_mean.clone()
    flags = [m.training for m in net.modules()]
    x_adv = module.perturb(x, y)
    assert module.in_threat_model(x, x_adv).all() and not x_adv.requires_grad
    assert [m.training for m in net.modules()] == flags
    assert all(p.grad is None for p in module.parameters())
    assert not any(m._forward_hooks for m in net.modules())
    assert [d.shape[1:] for d in module.layer_deltas] == [(4, 8, 8), (4, 4, 4), (8, 2, 2)]
    out = module.outer_loss(x, x_adv, y)
    assert not any(m._forward_hooks for m in net.modules())
    clean = F.cross_entropy(net(x_adv), y)
    assert out.loss > clean  # the layer perturbations ascend the loss
    # eval attack mode: running statistics untouched; the official "train" mode updates them
    assert not torch.equal(net.features[1].running_mean, running)
    running = net.features[1].running_mean.clone()
    RLAT(net, eps=0.5, attack_bn_mode="eval").perturb(x, y)
    torch.testing.assert_close(net.features[1].running_mean, running)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="eps_policy"):
        RLAT(SmallCNN(width=4), eps_policy="adaptive")
    with pytest.raises(ValueError, match="grow_policy"):
        RLAT(SmallCNN(width=4), grow_policy="up")
    with pytest.raises(ValueError, match="layers"):
        RLAT(SmallCNN(width=4), layers=["features.99"])
    with pytest.raises(ValueError, match="layers"):
        RLAT(_tiny())  # no default for an unknown backbone
    assert RLAT(_tiny(), layers=[]).layers == []
    assert math.isclose(RLAT(SmallCNN(width=4)).eps, 0.08) and RLAT(SmallCNN(width=4)).norm == "l2"


def _noise_and_l2_pgd(model):
    x, y = digits().splits["test"].tensors
    model.eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
        noisy = (x + 0.4 * torch.randn(x.shape, generator=g)).clamp(0, 1)
        noise = (model(noisy).argmax(1) == y).float().mean().item()
    torch.manual_seed(0)
    pgd = (PGD(0.5, steps=10, norm="l2").run(model, x, y).predictions == y).float().mean().item()
    return {"clean": clean, "noise": noise, "pgd": pgd}


def test_rlat_is_more_robust_to_noise_than_standard_training_on_digits():
    # The same evaluation for both: Gaussian noise of std 0.4 on the 359 test digits, and L2 PGD-10 at 0.5.
    standard = _noise_and_l2_pgd(fit_on_digits(StandardTraining(SmallCNN(width=8), eps=0.25, norm="l2",
                                                                optimizer=sgd())).model)
    rlat = _noise_and_l2_pgd(fit_on_digits(RLAT(SmallCNN(width=8), eps=0.25, optimizer=sgd())).model)
    # measured (seed 0, 8 epochs): standard 0.964 clean / 0.588 noise / 0.376 PGD; RLAT 0.922 / 0.738 / 0.627
    assert rlat["noise"] > standard["noise"] + 0.08, (standard, rlat)
    assert rlat["pgd"] > standard["pgd"] + 0.15, (standard, rlat)
    assert rlat["clean"] > 0.85, rlat
