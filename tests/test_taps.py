"""TAPS: the gradient connector's formula, the head's IBP is the network's IBP, the reductions to IBP (affine
head) and to a margin attack (whole network as head), IBP <= TAPS <= clean margins, the product loss, and a
digits run that certifies more than standard training."""

import lightning.pytorch as L
import pytest
import torch
from digits_bench import digits, training_only_trainer

from lit_robust.certify import ibp_margin_bounds, robust_cross_entropy
from lit_robust.certify.bounds import _specification
from lit_robust.defenses import CERTIFIED_DEFENSES, TAPS, CertifiedTraining
from lit_robust.defenses.taps import RectifiedLinearLink, _Head, split_layers
from lit_robust.models import CNN3, DIGITS_MEAN, DIGITS_STD

EPS = 0.1
LAYERS = 7  # CNN3 as bound propagation sees it: Normalize, Conv, ReLU, Conv, ReLU, Flatten, Linear


def _net(bn=False) -> CNN3:
    return CNN3(in_channels=1, input_size=8, mean=DIGITS_MEAN, std=DIGITS_STD, bn=bn)


def _adam(lr=5e-3):
    return lambda params: torch.optim.Adam(params, lr=lr)


def _pair(**kwargs):
    """TAPS and CertifiedTraining(ibp) with the same weights, at the full radius, in train mode."""
    L.seed_everything(0)
    module = TAPS(_net(), eps=EPS, eps_ramp_epochs=0, **kwargs).train()
    reference = CertifiedTraining(_net(), eps=EPS, eps_ramp_epochs=0, ibp_init=False).train()
    reference.load_state_dict(module.state_dict())
    return module, reference


def _grads(module, loss):
    module.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in module.model.parameters()]


def _margins(logits, y):
    """``[B, K-1]`` margins ``z_y - z_j``, ``j != y`` increasing (the column order of the bounds)."""
    return torch.stack([torch.cat([logits[i, y[i]] - logits[i, :y[i]], logits[i, y[i]] - logits[i, y[i] + 1:]])
                        for i in range(len(y))])


def test_registered():
    assert CERTIFIED_DEFENSES["TAPS"] is TAPS


def test_connector_splits_each_points_gradient_onto_the_bounds_by_the_rectified_linear_formula():
    # one example, three coordinates with box [0, 1], [0, 1] and the degenerate [0.3, 0.3]; two points
    lower = torch.tensor([[[0.0, 0.0, 0.3]]], requires_grad=True)
    upper = torch.tensor([[[1.0, 1.0, 0.3]]], requires_grad=True)
    points = torch.tensor([[[0.9, 0.5, 0.3], [0.2, 1.0, 0.3]]])
    out = RectifiedLinearLink.apply(lower, upper, points, 0.5, 1e-5)
    assert torch.equal(out, points)  # the identity forward
    g = torch.tensor([[[2.0, 3.0, 4.0], [5.0, 7.0, 11.0]]])
    (out * g).sum().backward()
    # c = 0.5: slack s = 0.5 (u - l); to u: g (x - (u - s)) / s where x >= u - s;
    #                                  to l: g ((l + s) - x) / s where x <= l + s
    # coordinate 0: 0.9 -> u gets 2 * 0.4 / 0.5; 0.2 -> l gets 5 * 0.3 / 0.5
    # coordinate 1: 0.5 sits on both thresholds (numerator clamped to tol / 2 = 5e-6: 3 * 1e-5 each); 1.0 -> u gets 7
    # coordinate 2 (l = u = x): numerator tol / 2, slack clamped to tol: half of each gradient to each bound
    expected_upper = torch.tensor([[[2 * 0.8, 3 * 1e-5 + 7.0, (4.0 + 11.0) / 2]]])
    expected_lower = torch.tensor([[[5 * 0.6, 3 * 1e-5, (4.0 + 11.0) / 2]]])
    assert torch.allclose(upper.grad, expected_upper, rtol=1e-5, atol=1e-7)
    assert torch.allclose(lower.grad, expected_lower, rtol=1e-5, atol=1e-7)
    # c = 1: every point in the box sends g (x - l) / (u - l) to u and g (u - x) / (u - l) to l
    lower.grad, upper.grad = None, None
    (RectifiedLinearLink.apply(lower, upper, points, 1.0, 1e-5) * g).sum().backward()
    assert torch.allclose(upper.grad[0, 0, :2], torch.tensor([2 * 0.9 + 5 * 0.2, 3 * 0.5 + 7 * 1.0]), rtol=1e-5)
    assert torch.allclose(lower.grad[0, 0, :2], torch.tensor([2 * 0.1 + 5 * 0.8, 3 * 0.5 + 7 * 0.0]), rtol=1e-4,
                          atol=1e-4)


@pytest.mark.parametrize("bn,train", [(False, True), (True, True), (True, False)])
def test_ibp_through_the_head_from_the_extractors_box_is_the_networks_ibp(batch, bn, train):
    """IBP is compositional: for every split, the head's elided IBP over the latent box is ``ibp_margin_bounds``
    (BN with the clean batch's statistics in train mode, the running ones in eval mode)."""
    x, y = batch
    torch.manual_seed(0)
    module = TAPS(_net(bn), eps=EPS, eps_ramp_epochs=0).train(train)
    if bn:
        with torch.no_grad():
            module.model.train()(x)  # running statistics away from their initial values
            module.model.train(train)
    reference = ibp_margin_bounds(module.model, x, y, EPS)
    for head_layers in range(1, len(split_layers(module.model, 1)[0]) + 2):
        module.head_layers = head_layers
        lower, upper, z, layers = module.latent_box(x, EPS)
        head = _Head(layers, z)
        assert torch.allclose(head(z), module.model(x), atol=1e-5)  # the head on the clean latent: the logits
        bounds = head.ibp_margins(lower, upper, _specification(y, 10, z))
        assert torch.allclose(bounds, reference, atol=1e-5), head_layers


def test_with_an_affine_head_taps_is_ibp_in_value_and_gradient(batch):
    """Flatten-Linear as head: PGD ends at the box vertex IBP's elided bound picks, and the connector sends the
    head's gradient at that vertex to the bound IBP's gradient goes to: TAPS's loss and gradient are IBP's."""
    x, y = batch
    module, reference = _pair(head_layers=2, ibp_loss=False)
    taps, ibp = module.taps_margins(x, y, EPS)
    assert torch.allclose(taps, ibp, atol=1e-5)
    assert torch.allclose(ibp, ibp_margin_bounds(module.model, x, y, EPS), atol=1e-6)
    torch.manual_seed(0)
    loss = module.certified_loss(x, y)
    ibp_loss = reference.certified_loss(x, y)
    assert loss.item() == pytest.approx(ibp_loss.item(), rel=1e-5)
    for g, r in zip(_grads(module, loss), _grads(reference, ibp_loss)):
        assert torch.allclose(g, r, rtol=1e-3, atol=1e-5)
    # the official product loss: L_TAPS x L_IBP = L_IBP^2, the first factor's gradient times alpha = 5
    module.ibp_loss = True
    torch.manual_seed(0)
    product = module.certified_loss(x, y)
    assert product.item() == pytest.approx(ibp_loss.item() ** 2, rel=1e-5)
    ibp_loss = reference.certified_loss(x, y)
    for g, r in zip(_grads(module, product), _grads(reference, ibp_loss)):
        assert torch.allclose(g, (5 + 1) * ibp_loss.item() * r, rtol=1e-3, atol=1e-5)


def test_taps_margins_lie_between_ibp_and_the_clean_margins(batch):
    """A nonlinear head (Conv-ReLU-Flatten-Linear): PGD's points are in the latent box, so their margins are
    no lower than IBP's sound bound; PGD lowers them below the clean margins (the clean latent is in the box)."""
    x, y = batch
    module, _ = _pair(head_layers=4)
    lower, upper, z, layers = module.latent_box(x, EPS)
    C = _specification(y, 10, z)
    torch.manual_seed(0)
    points = module.worst_points(_Head(layers, z.detach()), lower, upper, C)
    assert points.shape == (len(y), 9, *z.shape[1:])
    assert (points >= lower.unsqueeze(1)).all() and (points <= upper.unsqueeze(1)).all()
    torch.manual_seed(0)
    taps, ibp = module.taps_margins(x, y, EPS)
    assert torch.allclose(taps, _Head(layers, z).margins(points, C), atol=1e-6)
    with torch.no_grad():
        clean = _margins(module.model(x), y)
    assert (taps >= ibp - 1e-5).all() and (taps <= clean + 1e-5).all()
    assert (taps - ibp).mean() > 0.5 and (clean - taps).mean() > 0.1  # strictly tighter than IBP, below clean


def test_with_the_whole_network_as_head_taps_is_a_margin_attack_on_the_input_ball(batch):
    x, y = batch
    module, _ = _pair(head_layers=LAYERS)
    lower, upper, z, layers = module.latent_box(x, EPS)
    assert torch.equal(z, x) and torch.equal(lower, (x - EPS).clamp(0, 1)) and torch.equal(upper, (x + EPS).clamp(0, 1))
    C = _specification(y, 10, x)
    torch.manual_seed(0)
    points = module.worst_points(_Head(layers, x), lower, upper, C)
    torch.manual_seed(0)
    taps, _ = module.taps_margins(x, y, EPS)
    with torch.no_grad():
        for j in range(9):  # the j-th margin, taken at the j-th point: an input of the ball
            assert torch.allclose(taps[:, j], _margins(module.model(points[:, j]), y)[:, j], atol=1e-5)
        assert (taps <= _margins(module.model(x), y) + 1e-5).all()


def test_the_extractor_learns_only_through_the_box_bounds_as_the_connector_says(batch):
    """A nonlinear head, TAPS loss alone: the extractor's gradient is that of <G_l, l> + <G_u, u>, with G the
    connector's formula (c = 0.5) applied to the loss gradient at PGD's points."""
    x, y = batch
    module, _ = _pair(head_layers=4, ibp_loss=False)
    torch.manual_seed(3)
    grads = _grads(module, module.certified_loss(x, y))

    lower, upper, z, layers = module.latent_box(x, EPS)
    C = _specification(y, 10, z)
    torch.manual_seed(3)
    points = module.worst_points(_Head(layers, z.detach()), lower, upper, C).requires_grad_(True)
    g, = torch.autograd.grad(robust_cross_entropy(_Head(layers, z.detach()).margins(points, C)), points)
    l, u, p = lower.detach().unsqueeze(1), upper.detach().unsqueeze(1), points.detach()
    s = 0.5 * (u - l)
    to_upper = torch.where(p >= u - s, g * (p - (u - s)).clamp(min=5e-6) / s.clamp(min=1e-5), 0).sum(1)
    to_lower = torch.where(p <= l + s, g * ((l + s) - p).clamp(min=5e-6) / s.clamp(min=1e-5), 0).sum(1)
    module.zero_grad()
    ((to_lower * lower).sum() + (to_upper * upper).sum()).backward()
    first_conv = [p for p in module.model.parameters()][:2]  # the extractor: the first conv's weight and bias
    assert all(q.grad.abs().sum() > 0 for q in first_conv)
    for q, expected in zip(first_conv, grads[:2]):
        assert torch.allclose(q.grad, expected, rtol=1e-4, atol=1e-6)
    assert grads[-1].abs().sum() > 0  # and the head learns at the points


def test_ibp_during_the_ramp_then_taps(batch):
    x, y = batch
    module, reference = _pair(head_layers=4)
    for m in (module, reference):
        m.objective.set_eps(EPS / 2)
    assert module.certified_loss(x, y).item() == reference.certified_loss(x, y).item()
    module.ibp_warmup = False  # official --no-ibp-anneal: TAPS at the ramped radius
    torch.manual_seed(0)
    taps, ibp = module.taps_margins(x, y, EPS / 2)
    torch.manual_seed(0)
    loss = module.certified_loss(x, y)
    assert loss.item() == pytest.approx(robust_cross_entropy(taps).item() * robust_cross_entropy(ibp).item(), rel=1e-5)
    assert loss.item() < reference.certified_loss(x, y).item() ** 2


def test_pgd_weight_mixes_the_bounds(batch):
    x, y = batch
    module, reference = _pair(head_layers=4, pgd_weight=0.25, ibp_loss=False)
    torch.manual_seed(0)
    taps, ibp = module.taps_margins(x, y, EPS)
    torch.manual_seed(0)
    loss = module.certified_loss(x, y)
    assert loss.item() == pytest.approx(robust_cross_entropy(0.25 * taps + 0.75 * ibp).item(), rel=1e-5)
    module.pgd_weight = 0.0  # the box bound alone: IBP training
    assert module.certified_loss(x, y).item() == pytest.approx(reference.certified_loss(x, y).item(), rel=1e-6)


def test_arguments_are_checked():
    for head_layers in (0, LAYERS + 1, 2.5, True):
        with pytest.raises(ValueError, match=r"head_layers must be an integer in \[1, 7\].*Normalize, Conv2d"):
            TAPS(_net(), head_layers=head_layers)
    for kwargs in ({"pgd_steps": 0}, {"restarts": 0}, {"soft_threshold": 0.0}, {"soft_threshold": 1.5},
                   {"grad_expansion": 0.0}, {"pgd_weight": 1.5}):
        with pytest.raises(ValueError):
            TAPS(_net(), **kwargs)
    with pytest.raises(TypeError, match="nn.Sequential"):  # as every bound-based defense: not splittable
        TAPS(torch.nn.Module())


# TAPS's digits run (certified accuracy against standard, IBP, SABR and MTL-IBP in one setting) is a case of
# tests/test_sabr_mtlibp.py::test_digits_certified_accuracy_beats_standard_training.


def test_config_instantiates_with_its_values(tmp_path):
    import yaml
    from pathlib import Path

    from lit_robust.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "cifar10" / "taps.yaml"
    cli = main(["--config", str(config), f"--trainer.default_root_dir={tmp_path}"], run=False)
    spec = yaml.safe_load(config.read_text())["model"]["init_args"]
    assert type(cli.model).__name__ == "TAPS"
    for key in ("head_layers", "pgd_steps", "restarts", "soft_threshold", "grad_expansion", "pgd_weight", "eps"):
        assert getattr(cli.model, key) == pytest.approx(spec[key])
    assert cli.model.ibp_loss and cli.model.ibp_warmup
    assert [type(m).__name__ for m in split_layers(cli.model.model, cli.model.head_layers)[1]] == [
        "Linear", "BatchNorm1d", "ReLU", "Linear"]  # the official --block-sizes 17 4 on CNN7


@pytest.mark.parametrize("bn", [False, True])
def test_fit_validate_test_log_certified_accuracy(tmp_path, bn):
    from digits_bench import quiet_trainer

    data = digits()
    module = TAPS(_net(bn), eps=EPS, eps_ramp_epochs=0, pgd_steps=3, val_attack_steps=1, test_attack_steps=1)
    trainer = quiet_trainer(tmp_path, fast_dev_run=2)
    trainer.fit(module, data)
    assert all(torch.isfinite(trainer.callback_metrics[k]) for k in ("train/loss", "train/taps_acc"))
    for stage, run in (("val", trainer.validate), ("test", trainer.test)):
        metrics = run(module, data, verbose=False)[0]
        assert all(0.0 <= metrics[f"{stage}/{m}_acc"] <= 1.0 for m in ("clean", "robust", "certified"))



@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_the_taps_phase_does_not_sync_with_the_host(tmp_path, precision):
    """tests/test_host_sync.py runs the registry's TAPS inside its eps ramp (the IBP warm-up): here the TAPS
    phase itself (full radius from the start, BN in the head), under fp32 and bf16 autocast."""
    from test_host_sync import recorded

    from lit_robust.datamodules import DigitsDataModule

    module = TAPS(_net(bn=True), eps=EPS, eps_ramp_epochs=0, pgd_steps=3)
    seen = []
    module.training_step = recorded(module.training_step, "cpu", seen)
    trainer = training_only_trainer(tmp_path, max_epochs=1, limit_train_batches=3, log_every_n_steps=1,
                                    precision=precision)
    trainer.fit(module, DigitsDataModule(batch_size=16))
    assert seen == [[], []] and torch.isfinite(trainer.callback_metrics["train/taps_acc"])
