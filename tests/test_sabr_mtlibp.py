"""SABR and MTL-IBP: the small box and its soundness, the reductions to IBP / PGD-AT their papers state,
and digits runs that certify more than standard training."""

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from digits_bench import digits, training_only_trainer

from lit_robust.certify import ibp_margin_bounds
from lit_robust.certify.bounds import interval_bounds
from lit_robust.defenses import CERTIFIED_DEFENSES, MTLIBP, SABR, TAPS, CertifiedTraining, StandardTraining
from lit_robust.defenses.sabr import small_box
from lit_robust.models import CNN3, DIGITS_MEAN, DIGITS_STD

EPS = 0.1


def _net() -> CNN3:
    return CNN3(in_channels=1, input_size=8, mean=DIGITS_MEAN, std=DIGITS_STD)


def _adam(lr=5e-3):
    return lambda params: torch.optim.Adam(params, lr=lr)


def test_registered():
    assert CERTIFIED_DEFENSES["SABR"] is SABR and CERTIFIED_DEFENSES["MTLIBP"] is MTLIBP


def test_sabr_box_lies_in_the_ball_has_radius_lambda_eps_and_its_bounds_are_sound(batch):
    torch.manual_seed(0)
    x, y = batch
    module = SABR(_net(), eps=EPS, lambda_ratio=0.3, eps_ramp_epochs=0).eval()
    centre, radius = module.box(x, y)
    lo, hi = (x - EPS).clamp(0, 1), (x + EPS).clamp(0, 1)
    low, high = (centre - radius).clamp(0, 1), (centre + radius).clamp(0, 1)  # the box the bounds propagate
    assert (low >= lo - 1e-6).all() and (high <= hi + 1e-6).all()
    wide = (hi - lo) >= 2 * 0.3 * EPS  # pixels whose clipped ball fits the box: radius exactly lambda * eps
    assert wide.float().mean() > 0.5
    assert torch.allclose(radius[wide], torch.full_like(radius[wide], 0.3 * EPS))
    assert torch.allclose(radius[~wide], (hi - lo)[~wide] / 2)
    assert not torch.equal(centre, x)  # the centre moved towards the attack
    lower, upper = interval_bounds(module.model, centre, radius)
    margins = ibp_margin_bounds(module.model, centre, y, radius)
    with torch.no_grad():
        for _ in range(50):
            sample = low + (high - low) * torch.rand_like(x)
            z = module.model(sample)
            assert (z >= lower - 1e-5).all() and (z <= upper + 1e-5).all()
            others = torch.stack([torch.cat([z[i, y[i]] - z[i, :y[i]], z[i, y[i]] - z[i, y[i] + 1:]])
                                  for i in range(len(y))])
            assert (others >= margins - 1e-5).all()
    # small boxes give tighter bounds than the ball
    assert (margins >= ibp_margin_bounds(module.model, x, y, EPS) - 1e-5).all()


def test_small_box_is_inside_the_ball_even_when_the_ball_is_clipped():
    x = torch.tensor([0.0, 0.03, 0.5, 0.97, 1.0])
    for tau in (0.0, 0.02, 0.05, 0.1):
        for x_adv in (x - 0.1, x + 0.1, x):
            centre, radius = small_box(x, x_adv.clamp(0, 1), 0.1, tau)
            lo, hi = (x - 0.1).clamp(0, 1), (x + 0.1).clamp(0, 1)
            assert ((centre - radius).clamp(0, 1) >= lo - 1e-7).all() and ((centre + radius).clamp(0, 1) <= hi + 1e-7).all()


def _pair(cls, **kwargs):
    """A defense and CertifiedTraining(ibp) with the same weights, at the full radius, in train mode."""
    L.seed_everything(0)
    module = cls(_net(), eps=EPS, eps_ramp_epochs=0, **kwargs).train()
    reference = CertifiedTraining(_net(), eps=EPS, eps_ramp_epochs=0, ibp_init=False).train()
    reference.load_state_dict(module.state_dict())
    return module, reference


def test_sabr_with_lambda_one_is_ibp_training(batch):
    x, y = batch
    module, reference = _pair(SABR, lambda_ratio=1.0)
    sabr, ibp = module.training_loss(x, y).loss, reference.training_loss(x, y).loss
    assert sabr.item() == pytest.approx(ibp.item(), rel=1e-6, abs=1e-7)
    # and with a smaller box, on the same weights, the loss is smaller (tighter bounds)
    module.lambda_ratio = 0.2
    assert module.training_loss(x, y).loss.item() < ibp.item()


def test_mtlibp_reduces_to_ibp_at_alpha_one_and_to_pgd_at_at_alpha_zero(batch):
    x, y = batch
    module, reference = _pair(MTLIBP, alpha=1.0)
    assert module.training_loss(x, y).loss.item() == reference.training_loss(x, y).loss.item()

    module, _ = _pair(MTLIBP, alpha=0.0, attack_steps=3, attack_step_size=0.5)
    torch.manual_seed(5)
    loss = module.training_loss(x, y).loss
    torch.manual_seed(5)
    with torch.no_grad():
        module.model(x)  # the clean forward training_loss makes (BN-free net: no state change, same RNG use)
    x_adv = module.adversarial_point(x, y)
    assert ((x_adv - x).abs() <= EPS + 1e-6).all() and not torch.equal(x_adv, x)
    assert loss.item() == pytest.approx(F.cross_entropy(module.model(x_adv), y).item(), rel=1e-6)

    half, _ = _pair(MTLIBP, alpha=0.5, attack_steps=3, attack_step_size=0.5)
    torch.manual_seed(5)
    mixed = half.training_loss(x, y).loss
    torch.manual_seed(5)
    ibp = CertifiedTraining.certified_loss(half, x, y)
    adv = F.cross_entropy(half.model(half.adversarial_point(x, y)), y)
    assert mixed.item() == pytest.approx(0.5 * ibp.item() + 0.5 * adv.item(), rel=1e-5)


def test_arguments_are_checked():
    for kwargs in ({"lambda_ratio": 1.5}, {"lambda_ratio": -0.1}, {"attack_steps": 0}, {"attack_step_size": 0}):
        with pytest.raises(ValueError):
            SABR(_net(), **kwargs)
    for kwargs in ({"alpha": 2.0}, {"attack_steps": 0}, {"attack_eps_factor": 0}):
        with pytest.raises(ValueError):
            MTLIBP(_net(), **kwargs)


RESULTS = {}


@pytest.mark.parametrize("name", ["standard", "ibp", "sabr", "mtlibp", "taps"])
def test_digits_certified_accuracy_beats_standard_training(tmp_path, name):
    """10 epochs at eps 0.1 (ramp over 5), as tests/test_certified_training.py: each certified defense
    certifies far more than a standard network (IBP or CROWN-IBP at the module's eps)."""
    data = digits()
    x, y = data.splits["test"].tensors
    modules = {
        "standard": lambda: StandardTraining(_net(), optimizer=_adam()),
        "ibp": lambda: CertifiedTraining(_net(), eps=EPS, eps_ramp_epochs=5, optimizer=_adam()),
        "sabr": lambda: SABR(_net(), eps=EPS, eps_ramp_epochs=5, optimizer=_adam(), lambda_ratio=0.4,
                             attack_steps=4),
        "mtlibp": lambda: MTLIBP(_net(), eps=EPS, eps_ramp_epochs=5, optimizer=_adam(), alpha=0.5),
        "taps": lambda: TAPS(_net(), eps=EPS, eps_ramp_epochs=5, optimizer=_adam()),  # 4-layer head, 20 steps, alpha 5
    }
    L.seed_everything(0)
    module = modules[name]()
    training_only_trainer(tmp_path, max_epochs=10).fit(module, data)
    module.eval()
    judge = module if name != "standard" else CertifiedTraining(module.model, eps=EPS, ibp_init=False).eval()
    cert = judge.certify(x, y).float().mean().item()
    with torch.no_grad():
        clean = (module.model(x).argmax(1) == y).float().mean().item()
    RESULTS[name] = (clean, cert)
    print(f"\n{name}: clean {clean:.3f} certified {cert:.3f}")
    if name == "standard":
        assert cert < 0.05 and clean > 0.9
    else:
        assert cert > 0.3


@pytest.mark.parametrize("name", ["sabr.yaml", "mtl_ibp.yaml"])
def test_configs_instantiate_with_their_values(name, tmp_path):
    import yaml
    from pathlib import Path

    from lit_robust.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "cifar10" / name
    cli = main(["--config", str(config), f"--trainer.default_root_dir={tmp_path}"], run=False)
    spec = yaml.safe_load(config.read_text())["model"]["init_args"]
    assert type(cli.model).__name__ == {"sabr.yaml": "SABR", "mtl_ibp.yaml": "MTLIBP"}[name]
    for key in ("lambda_ratio", "alpha", "attack_steps", "attack_step_size", "attack_eps_factor"):
        if key in spec:
            assert getattr(cli.model, key) == pytest.approx(spec[key])


@pytest.mark.parametrize("cls", [SABR, MTLIBP])
def test_fit_validate_test_with_batchnorm_log_certified_accuracy(tmp_path, cls):
    from digits_bench import quiet_trainer

    data = digits()
    net = CNN3(in_channels=1, input_size=8, mean=DIGITS_MEAN, std=DIGITS_STD, bn=True)
    module = cls(net, eps=EPS, eps_ramp_epochs=0, method="crown-ibp", final_beta=0.5, val_attack_steps=1,
                 test_attack_steps=1)
    trainer = quiet_trainer(tmp_path, fast_dev_run=2)
    trainer.fit(module, data)
    assert torch.isfinite(trainer.callback_metrics["train/box_certified_acc" if cls is SABR else "train/adv_loss"])
    for stage, run in (("val", trainer.validate), ("test", trainer.test)):
        metrics = run(module, data, verbose=False)[0]
        assert all(0.0 <= metrics[f"{stage}/{m}_acc"] <= 1.0 for m in ("clean", "robust", "certified"))
