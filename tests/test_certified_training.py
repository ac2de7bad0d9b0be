"""CertifiedTraining and GaussianLossSmoothing: the eps ramp and beta the loss really gets, the loss against
its formula, clipping, metrics, and a digits run whose certified accuracy beats a standard network's."""

import math

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from digits_bench import digits, quiet_trainer, training_only_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_robust.attacks import PGD
from lit_robust.certify import CertifiedObjective, certified, crown_ibp_margin_bounds, ibp_margin_bounds
from lit_robust.defenses import CertifiedTraining, GaussianLossSmoothing, StandardTraining
from lit_robust.models import CNN3, DIGITS_MEAN, DIGITS_STD, SmallCNN

EPS = 0.1


def _net() -> CNN3:
    return CNN3(in_channels=1, input_size=8, mean=DIGITS_MEAN, std=DIGITS_STD)


def _adam(lr=5e-3):
    return lambda params: torch.optim.Adam(params, lr=lr)


class _Recording(CertifiedTraining):
    def __init__(self, **kwargs):
        super().__init__(_net(), eps=EPS, optimizer=_adam(), **kwargs)
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.global_step, self.objective.eps, self.objective.beta))
        return super().training_step(batch, batch_idx)


def _smoothed_scheduler(s, eps_max, start, length, per_epoch, mid=0.25, beta=4.0):
    """auto_LiRPA's SmoothedScheduler as written in the design notes (steps s from 0)."""
    s0, s1 = (start - 1) * per_epoch, (start + length - 1) * per_epoch
    sm = s0 + math.floor((s1 - s0) * mid)
    t = (sm - s0) ** (beta - 1)
    alpha = eps_max / ((s1 - sm) * beta * t + (sm - s0) * t)
    if s <= s0:
        return 0.0
    if s < sm:
        return alpha * (s - s0) ** beta
    return min(alpha * (sm - s0) ** beta + (eps_max - alpha * (sm - s0) ** beta) * (s - sm) / (s1 - sm), eps_max)


def test_eps_ramp_and_beta_follow_the_reference_schedules(tmp_path):
    module = _Recording(method="crown-ibp", final_beta=0.25, train_eps_factor=1.1, eps_ramp_epochs=2,
                        eps_warmup_epochs=1)
    training_only_trainer(tmp_path, max_epochs=4, limit_train_batches=4).fit(module, digits())
    eps_max = 1.1 * EPS
    assert len(module.seen) == 16
    for step, eps, beta in module.seen:
        assert eps == pytest.approx(_smoothed_scheduler(step, eps_max, start=2, length=2, per_epoch=4), abs=1e-12)
        assert beta == pytest.approx((eps_max - eps * (1 - 0.25)) / eps_max)
    assert module.seen[3][1] == 0.0 and module.seen[-1][1] == pytest.approx(eps_max)


def test_smoothed_ramp_reproduces_the_published_cifar_example():
    # design notes: start 2, length 80 at 8/255 gives 0.74/255 at epoch 22 and 4.2/255 at epoch 50
    module = CertifiedTraining(_net(), eps=8 / 255)
    (ramp,) = [c for c in module.configure_callbacks() if type(c).__name__ == "EpsilonSchedule"]
    ramp.final = 8 / 255
    assert ramp.value(22) * 255 == pytest.approx(0.74, abs=0.005)
    assert ramp.value(50) * 255 == pytest.approx(4.2, abs=0.05)
    assert ramp.value(81) == ramp.value(120) == pytest.approx(8 / 255) and ramp.value(1.0) == 0.0


def test_objective_mixes_crown_and_ibp_by_beta(batch):
    torch.manual_seed(0)
    net, (x, y) = CNN3(in_channels=1, input_size=8, mean=(0.5,), std=(0.25,)), batch
    objective = CertifiedObjective(0.02, "crown-ibp", final_beta=0.0)
    ibp, crown = ibp_margin_bounds(net, x, y, 0.01), crown_ibp_margin_bounds(net, x, y, 0.01)
    objective.set_eps(0.01)
    assert objective.beta == pytest.approx(0.5)
    assert torch.allclose(objective.margin_lower(net, x, y), 0.5 * crown + 0.5 * ibp, atol=1e-6)
    objective.set_eps(0.02)  # beta = 0: the CROWN pass is skipped, the IBP bound returned as is
    assert objective.beta == 0.0 and torch.equal(objective.margin_lower(net, x, y), ibp_margin_bounds(net, x, y, 0.02))
    loss, lower = objective.loss(net, x, y)
    logits = torch.cat([torch.zeros(len(y), 1), -lower], 1)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, torch.zeros_like(y)).item())


def test_loss_at_eps_zero_is_the_clean_cross_entropy(batch):
    torch.manual_seed(0)
    net, (x, y) = CNN3(in_channels=1, input_size=8, mean=(0.5,), std=(0.25,)), batch
    for method in ("ibp", "crown-ibp"):
        objective = CertifiedObjective(0.1, method)
        objective.set_eps(0.0)
        loss, _ = objective.loss(net, x, y)
        assert loss.item() == pytest.approx(F.cross_entropy(net(x), y).item(), rel=1e-5)


def test_kappa_ramps_like_beta_and_mixes_in_the_natural_cross_entropy(batch):
    """CROWN-IBP's robust_natural loss: (1 - kappa) robust CE + kappa CE(f(x), y), kappa 1 -> final_kappa."""
    torch.manual_seed(0)
    x, y = batch
    module = CertifiedTraining(_net(), eps=EPS, method="crown-ibp", final_kappa=0.5, train_eps_factor=2.0)
    objective = module.objective
    for eps, kappa in ((0.0, 1.0), (0.1, 0.75), (0.2, 0.5)):  # (max_eps - eps (1 - 0.5)) / max_eps, max_eps 0.2
        objective.set_eps(eps)
        assert objective.kappa == pytest.approx(kappa)
    objective.set_eps(0.1)
    reference = CertifiedTraining(_net(), eps=EPS, method="crown-ibp", train_eps_factor=2.0, ibp_init=False)
    reference.load_state_dict(module.state_dict())
    reference.objective.set_eps(0.1)
    module.train(), reference.train()
    mixed = module.training_loss(x, y).loss
    robust = reference.training_loss(x, y).loss  # running statistics move by the same clean forward in both
    with torch.no_grad():
        natural = F.cross_entropy(reference.model(x), y)
    assert mixed.item() == pytest.approx(0.25 * robust.item() + 0.75 * natural.item(), rel=1e-5)
    mixed.backward()  # the natural CE reaches the weights
    assert all(p.grad is not None for p in module.model.parameters())
    assert CertifiedTraining(_net(), eps=EPS).objective.kappa == 0.0
    with pytest.raises(ValueError, match="final_kappa"):
        CertifiedTraining(_net(), eps=EPS, final_kappa=1.5)


class _NormRecordingAdam(torch.optim.Adam):
    def __init__(self, params, norms):
        super().__init__(params, lr=1e-3)
        self.norms = norms

    def step(self, closure=None):
        loss = closure() if closure is not None else None  # Lightning clips inside the closure's wake
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        super().step()
        return loss


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_gradient_norm_is_clipped_unless_disabled(tmp_path, clip):
    norms = []
    module = CertifiedTraining(_net(), eps=EPS, eps_ramp_epochs=0, grad_clip_norm=clip,
                               optimizer=lambda p: _NormRecordingAdam(p, norms))
    training_only_trainer(tmp_path, max_steps=3).fit(module, digits())
    assert len(norms) == 3
    if clip:
        assert max(norms) <= clip * (1 + 1e-4)
    else:
        assert min(norms) > 1e-2


def test_fit_validate_test_log_certified_accuracy(tmp_path):
    data = digits()
    for module in (CertifiedTraining(_net(), eps=EPS, method="crown-ibp", val_attack_steps=1, test_attack_steps=1),
                   GaussianLossSmoothing(_net(), eps=EPS, estimator="pgpe", pairs=2, val_attack_steps=1,
                                         test_attack_steps=1)):
        trainer = quiet_trainer(tmp_path, fast_dev_run=2)
        trainer.fit(module, data)
        assert torch.isfinite(trainer.callback_metrics["train/loss"])
        val = trainer.validate(module, data, verbose=False)[0]
        test = trainer.test(module, data, verbose=False)[0]
        assert {"val/clean_acc", "val/robust_acc", "val/certified_acc"} <= set(val)
        assert {"test/clean_acc", "test/robust_acc", "test/certified_acc"} <= set(test)
        assert all(0.0 <= v <= 1.0 for v in (*val.values(), *test.values()))


def test_certified_training_on_digits_certifies_what_standard_training_cannot(tmp_path):
    """10 epochs of IBP training at eps 0.1 (ramp over 5): certified accuracy well above 0, a standard
    network of the same architecture certifies nothing, and no certified example is broken by PGD."""
    data = digits()
    x, y = data.splits["test"].tensors

    def fit(module):
        L.seed_everything(0)
        training_only_trainer(tmp_path, max_epochs=10).fit(module, data)
        return module.eval()

    robust = fit(CertifiedTraining(_net(), eps=EPS, eps_ramp_epochs=5, optimizer=_adam()))
    standard = fit(StandardTraining(_net(), optimizer=_adam()))
    certified_robust = robust.certify(x, y)
    judge = CertifiedTraining(standard.model, eps=EPS, ibp_init=False)
    assert certified_robust.float().mean() > 0.3
    assert judge.certify(x, y).float().mean() < 0.05
    with torch.no_grad():
        assert (standard.model(x).argmax(1) == y).float().mean() > 0.9  # the standard net is a fair baseline
    torch.manual_seed(0)
    not_broken = PGD(EPS, steps=20, restarts=2).run(robust.model, x, y).predictions == y
    assert not (certified_robust & ~not_broken).any()


def test_rgs_with_vanishing_noise_takes_the_certified_training_step(tmp_path):
    """With sigma -> 0 the smoothed gradient is the plain one: GLS-RGS and CertifiedTraining, same seed,
    batch and optimizer, end one SGD step at the same weights (checks the functional_call/surrogate path)."""
    def step(cls, **kwargs):
        L.seed_everything(0)
        module = cls(_net(), eps=EPS, method="crown-ibp", eps_ramp_epochs=0, grad_clip_norm=0,
                     optimizer=lambda p: torch.optim.SGD(p, lr=0.5), **kwargs)
        training_only_trainer(tmp_path, max_steps=1).fit(module, digits())
        return torch.cat([p.detach().flatten() for p in module.parameters()]), module

    plain, _ = step(CertifiedTraining)
    smoothed, module = step(GaussianLossSmoothing, estimator="rgs", sigma=1e-9, samples=1)
    assert torch.allclose(plain, smoothed, atol=1e-6)
    start = torch.cat([p.detach().flatten() for p in _seeded_init()])
    assert (plain - start).abs().max() > 1e-3  # the step did move the weights


def _seeded_init():
    L.seed_everything(0)
    return CertifiedTraining(_net(), eps=EPS).parameters()


def test_checkpoint_round_trip_and_determinism(tmp_path):
    def run(cls, **kwargs):
        L.seed_everything(3)
        module = cls(_net(), eps=EPS, eps_ramp_epochs=1, optimizer=_adam(), **kwargs)
        ckpt = ModelCheckpoint(dirpath=tmp_path / cls.__name__, save_last=True)
        quiet_trainer(tmp_path, max_steps=3, limit_val_batches=1, enable_checkpointing=True,
                      callbacks=[ckpt]).fit(module, digits())
        return module, ckpt.last_model_path

    for cls, kwargs in ((CertifiedTraining, {"method": "crown-ibp"}), (GaussianLossSmoothing, {"pairs": 2,
                                                                                              "estimator": "pgpe"})):
        module, path = run(cls, **kwargs)
        again, _ = run(cls, **kwargs)
        assert all(torch.equal(a, b) for a, b in zip(module.parameters(), again.parameters()))
        restored = cls.load_from_checkpoint(path, model=_net())
        assert dict(restored.hparams) == dict(module.hparams)
        assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), restored.state_dict().values()))


def test_arguments_are_checked():
    with pytest.raises(TypeError, match="nn.Sequential"):
        CertifiedTraining(SmallCNN())
    for kwargs in ({"method": "deeppoly"}, {"final_beta": 2.0}, {"eval_bounds": ()}, {"train_eps_factor": 0},
                   {"awp_gamma": 0.01}, {"norm": "l2"}, {"lower_slope": "half"}):
        with pytest.raises(ValueError):
            CertifiedTraining(_net(), **kwargs)
    for kwargs in ({"estimator": "es"}, {"sigma": 0.0}, {"pairs": 0}):
        with pytest.raises(ValueError):
            GaussianLossSmoothing(_net(), **kwargs)
    with pytest.raises(TypeError):
        CertifiedTraining(_net()).perturb(torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long))
    assert certified(torch.tensor([[0.1, 0.2], [0.1, -0.1]])).tolist() == [True, False]


def test_certificates_are_computed_in_float32_under_autocast(batch, monkeypatch):
    import lit_robust.defenses.certified as certified_module

    seen = []

    def recording(bound):
        def wrapped(*args, **kwargs):
            out = bound(*args, **kwargs)
            seen.append((out.dtype, torch.is_autocast_enabled("cpu")))
            return out
        return wrapped

    for name in ("ibp_margin_bounds", "crown_ibp_margin_bounds"):
        monkeypatch.setattr(certified_module, name, recording(getattr(certified_module, name)))
    module, (x, y) = CertifiedTraining(_net(), eps=0.01).eval(), batch
    plain = module.certify(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert module.model(x).dtype == torch.bfloat16  # autocast is really on around the call
        assert torch.equal(module.certify(x, y), plain)
    assert seen == [(torch.float32, False)] * 4
