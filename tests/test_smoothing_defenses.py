"""Randomized-smoothing training: the SmoothMix adversary and loss against their formulas (written here in
the official code's style), Gaussian augmentation, certified evaluation, recipes, digits behaviour."""

import copy

import pytest
import torch
import torch.nn.functional as F
from digits_bench import AttackSideEffects, InferenceModeSeen, digits, fit_on_digits, quiet_trainer, sgd
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lit_robust.attacks import smoothmix_attack
from lit_robust.certify.randomized_smoothing import Smooth, average_certified_radius, certified_accuracy
from lit_robust.datamodules import DigitsDataModule
from lit_robust.defenses import StandardTraining
from lit_robust.defenses.smoothing import EVAL_SEED, GaussianAugmentation, SmoothMix, warmup_weight
from lit_robust.models import SmallCNN

RADII = (0.0, 0.25, 0.5, 1.0)
TEST_NAMES = {"test/clean_acc", "test/noisy_acc", "test/certified_acc", "test/acr", "test/abstain_rate",
              *(f"test/certified_acc_r{r}" for r in RADII)}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # after conftest's (2): the machine's cores are shared


@pytest.fixture(scope="module")
def small_digits():
    dm = DigitsDataModule(batch_size=16, eval_batch_size=32)
    dm.setup()
    return dm


# --- references in the official code's style (jh-jeong/smoothmix, code/train.py) --------------


def reference_attack(model, x, y, noises, steps, alpha, mix_step=0, max_norm=None):
    """The adversary as the official ``SmoothMix_PGD.attack``: one forward per noise, averaged softmax."""
    was_training = model.training
    model.eval()
    adv, init = x.clone(), x.clone()
    for t in range(steps):
        if t == mix_step:
            init = adv.clone()
        adv = adv.detach().requires_grad_(True)
        avg = sum(F.softmax(model(adv + n), dim=1) for n in noises) / len(noises)
        loss = F.nll_loss(torch.log(avg.clamp(min=1e-20)), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, [adv])
        grad = grad / (grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-8)
        adv = adv.detach() + alpha * grad
        if max_norm is not None:
            adv = x + (adv - x).renorm(p=2, dim=0, maxnorm=max_norm)
        adv = adv.clamp(0, 1)
    model.train(was_training)
    return init, adv.detach()


def reference_loss(model, x_init, x_adv, y, noises, lam, w, eta, detach_p=False):
    """L_CE + eta * w * mean(1[argmax p_clean = y] * KL(y_mix || softmax f(x_mix + noise))), official style."""
    m = len(noises)
    logits_c = model(torch.cat([x_init + n for n in noises]))
    p_clean = sum(F.softmax(c, dim=1) for c in logits_c.chunk(m)) / m
    if detach_p:
        p_clean = p_clean.detach()
    ce = F.cross_entropy(logits_c, y.repeat(m))
    k = p_clean.shape[1]
    lam4 = lam.view(-1, 1, 1, 1)
    x_mix = (1 - lam4) * x_init + lam4 * x_adv
    y_mix = (1 - lam[:, None]) * p_clean + lam[:, None] * torch.full((1, k), 1.0 / k)
    log_q = F.log_softmax(model(torch.cat([x_mix + n for n in noises])), dim=1)
    kl = F.kl_div(log_q, y_mix.repeat(m, 1), reduction="none").sum(1)
    correct = (p_clean.argmax(1) == y).float().repeat(m)
    return ce + eta * w * (correct * kl).mean()


def smoothed_nll(model, x, y, noises):
    """Per example ``-log((1/m) sum_i softmax(f(x + noise_i))[y])`` (eval mode)."""
    with torch.no_grad():
        probs = torch.stack([F.softmax(model(x + n), dim=1) for n in noises]).mean(0)
    return -probs.gather(1, y[:, None]).squeeze(1).log()


def l2(t):
    return t.flatten(1).norm(dim=1)


# --- the adversary -------------------------------------------------------------------------------


def test_one_step_is_the_normalised_gradient_of_the_averaged_softmax_nll(tiny_cnn, batch):
    x, y = batch
    tiny_cnn.eval()
    noises = 0.5 * torch.randn(3, *x.shape)
    x_init, x_adv = smoothmix_attack(tiny_cnn, x, y, noises, steps=1, step_size=0.3)
    z = x.clone().requires_grad_(True)
    probs = torch.stack([F.softmax(tiny_cnn(z + n), dim=1) for n in noises]).mean(0)
    (g,) = torch.autograd.grad(-probs[torch.arange(len(y)), y].log().sum(), z)
    expected = (x + 0.3 * g / l2(g).view(-1, 1, 1, 1)).clamp(0, 1)
    assert torch.equal(x_init, x)
    assert torch.allclose(x_adv, expected, atol=1e-6)
    assert (l2(x_adv - x) > 0.05).all()  # the step was taken


@pytest.mark.parametrize("mix_step,max_norm", [(0, None), (1, None), (2, 0.4)])
def test_attack_matches_the_official_algorithm(tiny_cnn, batch, mix_step, max_norm):
    x, y = batch
    tiny_cnn.eval()
    noises = 0.25 * torch.randn(2, *x.shape)
    ours = smoothmix_attack(tiny_cnn, x, y, noises, 3, 0.5, mix_step=mix_step, max_norm=max_norm)
    reference = reference_attack(tiny_cnn, x, y, noises, 3, 0.5, mix_step=mix_step, max_norm=max_norm)
    for a, b in zip(ours, reference):
        assert torch.allclose(a, b, atol=1e-5)
        assert not a.requires_grad


def test_attack_ascends_stays_in_the_box_and_respects_max_norm(tiny_cnn, batch):
    x, y = batch
    tiny_cnn.eval()
    noises = 0.25 * torch.randn(4, *x.shape)
    _, x_adv = smoothmix_attack(tiny_cnn, x, y, noises, steps=4, step_size=0.5)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    before, after = smoothed_nll(tiny_cnn, x, y, noises), smoothed_nll(tiny_cnn, x_adv, y, noises)
    # a random direction of the same length barely moves the (untrained, near-uniform) model's NLL
    d = torch.randn_like(x)
    d = d * (l2(x_adv - x) / l2(d)).view(-1, 1, 1, 1)
    random = smoothed_nll(tiny_cnn, (x + d).clamp(0, 1), y, noises)
    assert (after > before).all() and (after - before).mean() > 5 * (random - before).abs().mean()
    assert l2(x_adv - x).max() > 0.8  # unbounded by default: 4 steps of 0.5 go beyond the ball below
    _, bounded = smoothmix_attack(tiny_cnn, x, y, noises, steps=4, step_size=0.5, max_norm=0.6)
    dist = l2(bounded - x)
    assert (dist <= 0.6 * (1 + 1e-5)).all() and dist.max() > 0.55
    assert bounded.min() >= 0 and bounded.max() <= 1


def test_mix_step_returns_that_iterate(tiny_cnn, batch):
    x, y = batch
    tiny_cnn.eval()
    noises = 0.25 * torch.randn(2, *x.shape)
    x_init, x_adv = smoothmix_attack(tiny_cnn, x, y, noises, steps=3, step_size=0.5, mix_step=0)
    assert torch.equal(x_init, x)
    two = smoothmix_attack(tiny_cnn, x, y, noises, steps=2, step_size=0.5)[1]
    x_init, x_adv3 = smoothmix_attack(tiny_cnn, x, y, noises, steps=3, step_size=0.5, mix_step=2)
    assert torch.equal(x_init, two) and torch.equal(x_adv3, x_adv) and not torch.equal(x_init, x_adv)


def test_attack_runs_in_eval_mode_restores_flags_and_leaves_no_gradients(tiny_cnn, batch):
    x, y = batch
    probe, seen = AttackSideEffects(tiny_cnn), []
    tiny_cnn.features[1].register_forward_hook(lambda m, i, o: seen.append((m.training, i[0].shape[0])))
    smoothmix_attack(tiny_cnn, x, y, 0.25 * torch.randn(3, *x.shape), steps=2, step_size=0.5)
    assert seen == [(False, 3 * len(y))] * 2  # one eval-mode forward of m*B images per step
    probe.assert_untouched()


def test_attack_arguments(tiny_cnn, batch):
    x, y = batch
    noises = torch.zeros(2, *x.shape)
    for kwargs, name in [({"steps": 0}, "steps"), ({"step_size": 0.0}, "step_size"), ({"mix_step": 2}, "mix_step"),
                         ({"max_norm": 0.0}, "max_norm")]:
        with pytest.raises(ValueError, match=name):
            smoothmix_attack(tiny_cnn, x, y, noises, **{"steps": 2, "step_size": 0.5, **kwargs})
    with pytest.raises(ValueError, match="noises"):
        smoothmix_attack(tiny_cnn, x, y, noises[:, :3], 2, 0.5)


# --- the SmoothMix loss ----------------------------------------------------------------------------


def _half_right_labels(model, x, noises):
    """Labels equal to the smoothed soft prediction on the noisy clean batch for even examples, wrong for odd ones."""
    probe = copy.deepcopy(model).train()  # train-mode BN, as in the loss; a copy, so running stats stay
    with torch.no_grad():
        m = len(noises)
        pred = (sum(F.softmax(c, 1) for c in probe(torch.cat([x + n for n in noises])).chunk(m)) / m).argmax(1)
    odd = torch.arange(len(x)) % 2 == 1
    return torch.where(odd, (pred + 1) % 10, pred), ~odd


def test_warmup_weight():
    assert [warmup_weight(e, 10) for e in range(12)] == pytest.approx([0.1 * (e + 1) for e in range(10)] + [1, 1])
    assert [warmup_weight(e, 4) for e in (0, 1, 2, 3, 50)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert warmup_weight(0, 0) == 1.0


@pytest.mark.parametrize("epoch,warmup", [(1, 4), (6, 4)])
def test_training_loss_matches_the_formula(tiny_cnn, batch, monkeypatch, epoch, warmup):
    x, _ = batch
    m, sigma, steps, alpha, eta = 3, 0.25, 2, 0.5, 2.0
    monkeypatch.setattr(SmoothMix, "current_epoch", property(lambda self: epoch))
    reference_model = copy.deepcopy(tiny_cnn)
    module = SmoothMix(tiny_cnn, sigma=sigma, num_noise_vec=m, steps=steps, step_size=alpha, eta=eta,
                       warmup_epochs=warmup).train()
    torch.manual_seed(11)
    y, right = _half_right_labels(tiny_cnn, x, sigma * torch.randn(m, *x.shape))
    torch.manual_seed(11)
    out = module.training_loss(x, y)
    torch.manual_seed(11)  # replay: noises, then the attack (no draws), then lambda
    noises = sigma * torch.randn(m, *x.shape)
    x_init, x_adv = reference_attack(reference_model, x, y, noises, steps, alpha)
    lam = torch.rand(len(y)) / 2
    assert (lam <= 0.5).all() and torch.equal(x_init, x)
    w = min(1.0, (epoch + 1) / warmup)
    expected = reference_loss(reference_model.train(), x_init, x_adv, y, noises, lam, w, eta)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.equal(out.clean_logits.argmax(1) == y, right)  # train/clean_acc: argmax p_clean
    without_mix = reference_loss(copy.deepcopy(reference_model), x_init, x_adv, y, noises, lam, w, 0.0)
    assert out.loss.item() > without_mix.item() + 1e-3  # the KL term is there


def test_mix_step_projects_x_init_to_the_warmed_up_ball(tiny_cnn, batch, monkeypatch):
    x, y = batch
    monkeypatch.setattr(SmoothMix, "current_epoch", property(lambda self: 0))
    module = SmoothMix(tiny_cnn, sigma=0.25, steps=3, step_size=0.5, mix_step=1, warmup_epochs=4).train()
    seen = {}
    original = module.smoothmix_loss

    def spy(x_init, x_adv, y, noises, lam, weight):
        seen.update(x_init=x_init, x_adv=x_adv, noises=noises, weight=weight)
        return original(x_init, x_adv, y, noises, lam, weight)

    monkeypatch.setattr(module, "smoothmix_loss", spy)
    stats = copy.deepcopy(tiny_cnn)
    module.training_loss(x, y)
    one_step, x_adv = reference_attack(stats, x, y, seen["noises"], 3, 0.5, mix_step=1)
    radius = 0.5 * 1 * 0.25  # step_size * mix_step * w_0
    expected = (x + (one_step - x).renorm(p=2, dim=0, maxnorm=radius)).clamp(0, 1)
    assert seen["weight"] == 0.25 and torch.allclose(seen["x_init"], expected, atol=1e-5)
    assert (l2(seen["x_init"] - x) <= radius * (1 + 1e-5)).all() and l2(seen["x_init"] - x).max() > 0.9 * radius
    assert torch.allclose(seen["x_adv"], x_adv, atol=1e-5)


def test_kl_term_vanishes_exactly_for_misclassified_examples(tiny_cnn, batch):
    x, _ = batch
    with torch.no_grad():
        tiny_cnn.head[-1].weight.mul_(30.0)  # confident predictions, so that the KL terms are not tiny
    module = SmoothMix(tiny_cnn, num_noise_vec=2, eta=5.0).eval()  # eval: examples do not share BN statistics
    noises = 0.25 * torch.randn(2, *x.shape)
    x_adv, lam = torch.rand_like(x), torch.rand(len(x)) / 2
    with torch.no_grad():
        pred = module.smoothmix_loss(x, x_adv, torch.zeros_like(lam, dtype=torch.long), noises, lam, 1.0)
        pred = pred.clean_logits.argmax(1)
        wrong = module.smoothmix_loss(x, x_adv, (pred + 1) % 10, noises, lam, 1.0).loss
        ce = F.cross_entropy(tiny_cnn(torch.cat([x + n for n in noises])), ((pred + 1) % 10).repeat(2))
        assert wrong.item() == pytest.approx(ce.item(), rel=1e-6)
        y = torch.where(torch.arange(len(x)) < 6, pred, (pred + 1) % 10)  # first 6 right, the rest wrong
        base = module.smoothmix_loss(x, x_adv, y, noises, lam, 1.0).loss
        moved_wrong, moved_right = x_adv.clone(), x_adv.clone()
        moved_wrong[6:], moved_right[:6] = 1 - x_adv[6:], 1 - x_adv[:6]
        assert module.smoothmix_loss(x, moved_wrong, y, noises, lam, 1.0).loss.item() == pytest.approx(base.item(),
                                                                                                       rel=1e-7)
        assert abs(module.smoothmix_loss(x, moved_right, y, noises, lam, 1.0).loss.item() - base.item()) > 1e-4
        # the masked KL is averaged over all m*B pairs (official ``(ind_correct * loss_mixup).mean()``)
        expected = reference_loss(tiny_cnn, x, x_adv, y, noises, lam, 0.5, 5.0)
        got = module.smoothmix_loss(x, x_adv, y, noises, lam, 0.5).loss
        assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_gradient_flows_through_p_clean(tiny_cnn, batch):
    x, _ = batch
    module = SmoothMix(tiny_cnn, num_noise_vec=2, eta=5.0).train()
    noises = 0.25 * torch.randn(2, *x.shape)
    x_adv, lam = torch.rand_like(x), torch.rand(len(x)) / 2
    y, _ = _half_right_labels(tiny_cnn, x, noises)
    params = list(tiny_cnn.parameters())

    def grads(loss):
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    ours = grads(module.smoothmix_loss(x, x_adv, y, noises, lam, 1.0).loss)
    attached = grads(reference_loss(tiny_cnn, x, x_adv, y, noises, lam, 1.0, 5.0))
    detached = grads(reference_loss(tiny_cnn, x, x_adv, y, noises, lam, 1.0, 5.0, detach_p=True))
    assert torch.allclose(ours, attached, atol=1e-6, rtol=1e-4)
    assert (ours - detached).abs().max() > 100 * (ours - attached).abs().max() + 1e-4
    assert all(p.grad is None for p in params)


# --- Gaussian augmentation ------------------------------------------------------------------------


def test_gaussian_augmentation_is_ce_on_unclipped_pixel_noise(tiny_cnn, batch):
    x, y = batch
    module = GaussianAugmentation(tiny_cnn, sigma=0.5).train()
    torch.manual_seed(4)
    out = module.training_loss(x, y)
    torch.manual_seed(4)
    noisy = x + 0.5 * torch.randn_like(x)
    assert noisy.min() < 0 and noisy.max() > 1  # not clipped
    logits = tiny_cnn(noisy)
    assert out.loss.item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert torch.allclose(out.clean_logits, logits)


def noisy_accuracy(model, sigma, draws=8):
    x, y = digits().splits["test"].tensors
    g = torch.Generator().manual_seed(0)
    model.eval()
    with torch.no_grad():
        return torch.stack([(model(x + sigma * torch.randn(x.shape, generator=g)).argmax(1) == y).float().mean()
                            for _ in range(draws)]).mean().item()


def test_gaussian_augmentation_beats_standard_training_under_noise():
    """Trained with sigma 0.25 for 5 epochs: 0.89 / 0.63 under noise 0.25 / 0.5 against standard training's
    0.77 / 0.39 (1 or 2 threads), at the price of a little clean accuracy (0.95 against 0.96)."""
    standard = fit_on_digits(StandardTraining(SmallCNN(width=8), optimizer=sgd()), epochs=5)
    smoothed = fit_on_digits(GaussianAugmentation(SmallCNN(width=8), sigma=0.25, optimizer=sgd()), epochs=5)
    std_acc, ga_acc = noisy_accuracy(standard.model, 0.25), noisy_accuracy(smoothed.model, 0.25)
    assert ga_acc > 0.85 and ga_acc > std_acc + 0.07, (ga_acc, std_acc)
    assert noisy_accuracy(smoothed.model, 0.5) > noisy_accuracy(standard.model, 0.5) + 0.15
    assert noisy_accuracy(smoothed.model, 0.0, draws=1) > 0.9


# --- the Lightning module: evaluation, recipe, checkpoints ----------------------------------------


def _make(cls, **kwargs):
    extra = {"num_noise_vec": 2, "steps": 2, "step_size": 0.5} if cls is SmoothMix else {}
    return cls(SmallCNN(width=4), **{"sigma": 0.25, "eps": 0.25, "test_radii": RADII, "test_n0": 8, "test_n": 64,
                                     **extra, **kwargs})


@pytest.mark.parametrize("cls", [SmoothMix, GaussianAugmentation])
def test_fit_validate_test_logs_certified_metrics(tmp_path, small_digits, cls):
    module, seen = _make(cls), InferenceModeSeen()
    trainer = quiet_trainer(tmp_path, fast_dev_run=2, callbacks=[seen])
    trainer.fit(module, small_digits)
    assert {"train/loss", "train/clean_acc", "val/clean_acc", "val/noisy_acc"} <= set(trainer.callback_metrics)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    seen.flags.clear()
    val = trainer.validate(module, small_digits, verbose=False)[0]
    test = trainer.test(module, small_digits, verbose=False)[0]
    assert seen.flags and all(seen.flags)
    assert set(val) == {"val/clean_acc", "val/noisy_acc"} and set(test) == TEST_NAMES
    assert all(0.0 <= v <= 1.0 for k, v in (*val.items(), *test.items()) if k != "test/acr")
    assert test["test/acr"] >= 0
    assert test == trainer.test(module, small_digits, verbose=False)[0]  # seeded evaluation noise: reproducible
    # the same certificates from Smooth, with the documented per-batch generators
    model = module.model.eval()
    predictions, radii, labels = [], [], []
    for i, (x, y) in zip(range(2), small_digits.test_dataloader()):
        g = torch.Generator().manual_seed(EVAL_SEED + i)
        torch.randn(x.shape, generator=g)  # the val/test noisy-accuracy draw comes first
        p, r = Smooth(model, 0.25).certify(x, 8, 64, 0.001, generator=g)
        predictions.append(p), radii.append(r), labels.append(y)
    p, r, y = torch.cat(predictions), torch.cat(radii), torch.cat(labels)
    expected = certified_accuracy(p, r, y, (0.25, *RADII))
    got = [test["test/certified_acc"], *(test[f"test/certified_acc_r{x}"] for x in RADII)]
    assert got == pytest.approx(expected.tolist(), abs=1e-6)
    assert test["test/acr"] == pytest.approx(average_certified_radius(p, r, y).item(), rel=1e-5)
    assert test["test/abstain_rate"] == pytest.approx((p == -1).float().mean().item())


@pytest.mark.parametrize("cls", [SmoothMix, GaussianAugmentation])
def test_checkpoint_round_trip(tmp_path, small_digits, cls):
    module = _make(cls)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    quiet_trainer(tmp_path, max_steps=2, limit_val_batches=1, enable_checkpointing=True,
                  callbacks=[ckpt]).fit(module, small_digits)
    restored = cls.load_from_checkpoint(ckpt.last_model_path, model=SmallCNN(width=4))
    assert dict(restored.hparams) == dict(module.hparams)
    assert (restored.sigma, restored.test_radii, restored.test_n) == (0.25, RADII, 64)
    state, back = module.state_dict(), restored.state_dict()
    assert state.keys() == back.keys() and all(torch.equal(state[k], back[k]) for k in state)


def test_defaults_are_the_papers():
    sm = SmoothMix(SmallCNN())
    assert (sm.sigma, sm.eps, sm.num_noise_vec, sm.steps, sm.step_size, sm.eta, sm.mix_step, sm.warmup_epochs,
            sm.max_norm, sm.norm) == (0.5, 0.5, 2, 4, 1.0, 5.0, 0, 10, None, "l2")
    ga = GaussianAugmentation(SmallCNN())
    assert (ga.sigma, ga.test_n0, ga.test_n, ga.test_alpha, ga.test_radii) == (
        0.5, 100, 100_000, 0.001, (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5))
    for module in (sm, ga):
        with pytest.raises(TypeError):
            module.scheduled_attack()
        with pytest.raises(TypeError):
            module.perturb(torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))


def test_default_optimizer_and_schedule(tmp_path, small_digits):
    """SGD 0.1 / 0.9 / 1e-4; x0.1 after 1/3 and 2/3 of the steps (Cohen: 30/60 of 90 epochs)."""
    seen = []

    class RecordLR(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = quiet_trainer(tmp_path, max_epochs=3, limit_train_batches=3, limit_val_batches=0, callbacks=[RecordLR()])
    trainer.fit(_make(GaussianAugmentation), small_digits)
    assert seen == pytest.approx([0.1] * 3 + [0.01] * 3 + [0.001] * 3)
    optimizer = trainer.optimizers[0]
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.SGD) and (group["momentum"], group["weight_decay"]) == (0.9, 1e-4)


@pytest.mark.parametrize("cls,kwargs,name", [
    (GaussianAugmentation, {"sigma": 0.0}, "sigma"), (GaussianAugmentation, {"test_n": 0}, "test_n"),
    (GaussianAugmentation, {"test_alpha": 1.0}, "test_alpha"),
    (GaussianAugmentation, {"test_radii": [-1]}, "test_radii"),
    (GaussianAugmentation, {"norm": "linf"}, "norm"), (GaussianAugmentation, {"awp_gamma": 0.01}, "awp_gamma"),
    (SmoothMix, {"num_noise_vec": 0}, "num_noise_vec"), (SmoothMix, {"mix_step": 4}, "mix_step"),
    (SmoothMix, {"eta": -1.0}, "eta"), (SmoothMix, {"warmup_epochs": -1}, "warmup_epochs"),
    (SmoothMix, {"max_norm": 0.0}, "max_norm"), (SmoothMix, {"step_size": 0.0}, "step_size"),
])
def test_bad_arguments_raise_naming_them(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(SmallCNN(), **kwargs)
