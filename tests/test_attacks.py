"""The attack contract: threat model respected, no parameter gradients, module flags restored,
FOSC equal to its formula, early stop freezing examples, restarts never worse, bad arguments rejected."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_robust.attacks import FGSM, PGD, fosc, module_mode
from lit_robust.attacks import functional as AF

NORM_CASES = [("linf", 0.1), ("l2", 0.5)]


def _dist(x_adv, x, norm):
    d = (x_adv - x).flatten(1)
    return d.abs().amax(1) if norm == "linf" else d.norm(dim=1)


@pytest.mark.parametrize("norm,eps", NORM_CASES)
@pytest.mark.parametrize("make", [
    lambda eps, norm: PGD(eps, steps=5, norm=norm),
    lambda eps, norm: PGD(eps, steps=3, norm=norm, restarts=2, loss="margin"),
    lambda eps, norm: PGD(eps, steps=3, norm=norm, random_start=False, loss="dlr", fosc_threshold=0.01),
    lambda eps, norm: FGSM(eps, norm=norm),
    lambda eps, norm: FGSM(eps, norm=norm, random_start=True),
])
def test_attack_stays_in_ball_and_box(tiny_cnn, batch, norm, eps, make):
    x, y = batch
    attack = make(eps, norm)
    for x_adv in (attack(tiny_cnn, x, y), attack.run(tiny_cnn, x, y).x_adv):
        assert x_adv.shape == x.shape and not x_adv.requires_grad
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert (_dist(x_adv, x, norm) <= eps * (1 + 1e-5)).all()
        assert (_dist(x_adv, x, norm) > 0).any()


@pytest.mark.parametrize("norm,eps", NORM_CASES)
def test_random_start_is_inside_ball_and_box(norm, eps):
    x = torch.rand(64, 3, 4, 4)
    delta = AF.random_start(x, eps, norm)
    assert ((x + delta).min() >= 0) and ((x + delta).max() <= 1)
    assert (_dist(x + delta, x, norm) <= eps * (1 + 1e-5)).all()
    assert _dist(x + delta, x, norm).std() > 0  # a real random draw, not a constant


def test_pgd_raises_the_loss_over_clean_and_fgsm(tiny_cnn, batch):
    x, y = batch
    tiny_cnn.eval()
    with torch.no_grad():
        clean = F.cross_entropy(tiny_cnn(x), y, reduction="none")
        fgsm = F.cross_entropy(tiny_cnn(FGSM(0.1)(tiny_cnn, x, y)), y, reduction="none")
        pgd = F.cross_entropy(tiny_cnn(PGD(0.1, steps=10)(tiny_cnn, x, y)), y, reduction="none")
    assert (pgd > clean).all()
    assert pgd.mean() > fgsm.mean() > clean.mean()


def test_attack_leaves_no_parameter_gradients(tiny_cnn, batch):
    x, y = batch
    PGD(0.1, steps=3, restarts=2, track_fosc=True).run(tiny_cnn, x, y)
    assert all(p.grad is None for p in tiny_cnn.parameters())


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_module_flags_restored_and_mode_applied(tiny_cnn, batch, bn_mode):
    x, y = batch
    tiny_cnn.train()
    tiny_cnn.features[1].eval()  # a BatchNorm the user froze on purpose
    before = {name: m.training for name, m in tiny_cnn.named_modules()}
    seen = []
    handle = tiny_cnn.features[4].register_forward_hook(lambda m, i, o: seen.append(m.training))
    PGD(0.1, steps=2, bn_mode=bn_mode).run(tiny_cnn, x, y)
    handle.remove()
    assert seen and all(flag == (bn_mode == "train") for flag in seen)
    assert {name: m.training for name, m in tiny_cnn.named_modules()} == before


def test_eval_mode_attack_leaves_batchnorm_statistics_alone(tiny_cnn, batch):
    x, y = batch
    bn = tiny_cnn.features[1]
    stats = bn.running_mean.clone()
    PGD(0.1, steps=3, bn_mode="eval").run(tiny_cnn, x, y)
    assert torch.equal(bn.running_mean, stats)
    PGD(0.1, steps=3, bn_mode="train").run(tiny_cnn, x, y)
    assert not torch.equal(bn.running_mean, stats)


def test_module_mode_restores_flags_after_an_exception(tiny_cnn):
    tiny_cnn.train()
    with pytest.raises(RuntimeError), module_mode(tiny_cnn, "eval"):
        assert not tiny_cnn.training
        raise RuntimeError
    assert all(m.training for m in tiny_cnn.modules())


def _per_example_grads(model, x_adv, y):
    """Gradient of each example's own CE, one example at a time (the reference for FOSC)."""
    grads = []
    for i in range(len(y)):
        xi = x_adv[i:i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xi), y[i:i + 1]), xi)
        grads.append(g)
    return torch.cat(grads)


@pytest.mark.parametrize("norm,eps", NORM_CASES)
def test_fosc_matches_formula_and_is_nonnegative(tiny_cnn, batch, norm, eps):
    x, y = batch
    tiny_cnn.eval()
    result = PGD(eps, steps=4, norm=norm, track_fosc=True).run(tiny_cnn, x, y)
    g = _per_example_grads(tiny_cnn, result.x_adv, y).flatten(1).double()
    d = (result.x_adv - x).flatten(1).double()
    dual = g.abs().sum(1) if norm == "linf" else g.norm(dim=1)
    expected = eps * dual - (d * g).sum(1)
    assert torch.allclose(result.fosc.double(), expected, rtol=1e-4, atol=1e-7)
    assert (result.fosc >= -1e-6).all()
    # functional form, same numbers; and FOSC is 0 only at a stationary point (zero gradient)
    assert torch.allclose(fosc(result.x_adv, x, g.view_as(x).float(), eps, norm), result.fosc, rtol=1e-4, atol=1e-7)
    assert torch.equal(fosc(x, x, torch.zeros_like(x), eps), torch.zeros(len(y)))


def test_fosc_uses_per_example_sum_not_batch_mean(tiny_cnn, batch):
    """A batch-mean loss would divide every gradient, hence FOSC, by B."""
    x, y = batch
    tiny_cnn.eval()
    x_adv = PGD(0.1, steps=2)(tiny_cnn, x, y)
    _, _, grad = AF.loss_and_input_grad(tiny_cnn, x, x_adv - x, y, AF.per_example_loss("ce"))
    assert torch.allclose(grad, _per_example_grads(tiny_cnn, x_adv, y), atol=1e-6)


def test_fosc_early_stop_freezes_examples(tiny_cnn, batch):
    x, y = batch
    tiny_cnn.eval()
    steps = 8
    reference = PGD(0.1, steps=steps, step_size=0.03, track_fosc=True).run(tiny_cnn, x, y)
    threshold = reference.fosc.median().item()

    stopped = _seeded(3, PGD(0.1, steps=steps, step_size=0.03, fosc_threshold=threshold), tiny_cnn, x, y)
    frozen = stopped.steps < steps
    assert frozen.any() and (~frozen).any(), "threshold should freeze some examples and not others"
    assert (stopped.steps >= 1).all()  # the first step is always taken, as in the official code
    # a frozen example stopped because FOSC at its (final) iterate fell to the threshold
    assert (stopped.fosc[frozen] <= threshold + 1e-6).all()

    # replay: the same random start with steps capped per example reproduces x_adv exactly
    for k in stopped.steps[frozen].unique().tolist():
        capped = _seeded(3, PGD(0.1, steps=k, step_size=0.03), tiny_cnn, x, y)
        rows = stopped.steps == k
        assert torch.allclose(capped.x_adv[rows], stopped.x_adv[rows])


def _seeded(seed, attack, *args):
    """``attack.run(*args)`` from a fixed RNG state, so two attacks share their random start."""
    torch.manual_seed(seed)
    return attack.run(*args)


def test_fosc_threshold_zero_changes_nothing(tiny_cnn, batch):
    x, y = batch
    tiny_cnn.eval()
    plain = _seeded(5, PGD(0.1, steps=5), tiny_cnn, x, y)
    gated = _seeded(5, PGD(0.1, steps=5, fosc_threshold=0.0), tiny_cnn, x, y)
    assert torch.equal(plain.x_adv, gated.x_adv)
    assert (gated.steps == 5).all()


def _fosc_before_reference_option(x_adv, x, grad, eps):
    """Linf FOSC exactly as computed before ``fosc_reference`` existed: from the clean image, in float32."""
    g = grad.flatten(1).float()
    return eps * g.abs().sum(1) - ((x_adv - x).flatten(1).float() * g).sum(1)


def test_fosc_reference_clean_is_the_previous_behaviour_bit_for_bit(tiny_cnn, batch):
    """The default, and ``"clean"``, reproduce the masked PGD and the FOSC of the code before the option."""
    x, y = batch
    tiny_cnn.eval()
    eps, steps, step_size, ce = 0.1, 6, 0.03, AF.per_example_loss("ce")
    tracked = _seeded(3, PGD(eps, steps=steps, step_size=step_size, track_fosc=True), tiny_cnn, x, y)
    threshold = float(tracked.fosc.median())

    torch.manual_seed(3)  # the previous loop, restated: FOSC from the clean x gates each step after the first
    delta, active = AF.random_start(x, eps, "linf"), torch.ones(len(y), dtype=torch.bool)
    for k in range(steps):
        _, _, grad = AF.loss_and_input_grad(tiny_cnn, x, delta, y, ce)
        if k > 0:
            active = active & (_fosc_before_reference_option(x + delta, x, grad, eps) > threshold)
        stepped = AF.project(AF.ascent_step(delta, grad, step_size, "linf"), x, eps, "linf")
        delta = torch.where(active.view(-1, 1, 1, 1), stepped, delta)
    x_adv = x + delta
    _, _, grad = AF.loss_and_input_grad(tiny_cnn, x, x_adv - x, y, ce)
    expected = _fosc_before_reference_option(x_adv, x, grad, eps)

    for attack in (PGD(eps, steps=steps, step_size=step_size, fosc_threshold=threshold),
                   PGD(eps, steps=steps, step_size=step_size, fosc_threshold=threshold, fosc_reference="clean")):
        result = _seeded(3, attack, tiny_cnn, x, y)
        assert torch.equal(result.x_adv, x_adv) and torch.equal(result.fosc, expected)
        assert bool((result.steps < steps).any())  # the threshold did freeze examples


@pytest.mark.parametrize("norm,eps", NORM_CASES)
def test_fosc_reference_start_measures_from_the_random_start(tiny_cnn, batch, norm, eps):
    """Official pgd_attack.py: eps * ||g||_* - <x_k - x_0, g>, x_0 the random start; differs from the paper's."""
    x, y = batch
    tiny_cnn.eval()
    torch.manual_seed(11)
    x0 = x + AF.random_start(x, eps, norm)  # the start the seeded attack draws
    start = _seeded(11, PGD(eps, steps=4, norm=norm, track_fosc=True, fosc_reference="start"), tiny_cnn, x, y)
    clean = _seeded(11, PGD(eps, steps=4, norm=norm, track_fosc=True), tiny_cnn, x, y)
    assert torch.equal(start.x_adv, clean.x_adv)  # without a threshold only the reported FOSC changes
    g = _per_example_grads(tiny_cnn, start.x_adv, y).flatten(1).double()
    dual = g.abs().sum(1) if norm == "linf" else g.norm(dim=1)
    expected = eps * dual - ((start.x_adv - x0).flatten(1).double() * g).sum(1)
    assert torch.allclose(start.fosc.double(), expected, rtol=1e-4, atol=1e-7)
    # the two differ by <x_0 - x, g>, far above float32 rounding (~1e-7 relative) on a random-start PGD
    shift = ((x0 - x).flatten(1).double() * g).sum(1)
    assert torch.allclose((start.fosc - clean.fosc).double(), shift, rtol=1e-3, atol=1e-8)
    assert ((start.fosc - clean.fosc).abs() > 1e-4 * clean.fosc.abs()).all()


def test_fosc_reference_start_gates_early_stopping_and_equals_clean_without_random_start(tiny_cnn, batch):
    x, y = batch
    tiny_cnn.eval()
    tracked = _seeded(5, PGD(0.1, steps=6, step_size=0.03, track_fosc=True, fosc_reference="start"), tiny_cnn, x, y)
    threshold = float(tracked.fosc.median())
    stopped = _seeded(5, PGD(0.1, steps=6, step_size=0.03, fosc_threshold=threshold, fosc_reference="start"),
                      tiny_cnn, x, y)
    frozen = stopped.steps < 6
    assert frozen.any() and (~frozen).any()
    assert (stopped.fosc[frozen] <= threshold + 1e-6).all()  # frozen on the start-referenced FOSC
    # without a random start the start is the clean image: identical runs
    same = [PGD(0.1, steps=4, random_start=False, fosc_threshold=0.05, fosc_reference=r).run(tiny_cnn, x, y)
            for r in ("clean", "start")]
    assert torch.equal(same[0].x_adv, same[1].x_adv) and torch.equal(same[0].fosc, same[1].fosc)


def test_fosc_keeps_float64_and_upcasts_low_precision(tiny_cnn, batch):
    x, y = batch
    model, x64 = tiny_cnn.double().eval(), x.double()
    result = PGD(0.1, steps=3, track_fosc=True).run(model, x64, y)
    assert result.fosc.dtype == torch.float64
    g = _per_example_grads(model, result.x_adv, y).flatten(1)
    expected = 0.1 * g.abs().sum(1) - ((result.x_adv - x64).flatten(1) * g).sum(1)
    assert torch.allclose(result.fosc, expected, rtol=1e-12, atol=1e-15)  # float32 would be off by ~1e-7
    grad = torch.randn_like(x)
    assert fosc(x, x, grad.bfloat16(), 0.1).dtype == torch.float32
    assert fosc(x.half(), x.half(), grad.half(), 0.1).dtype == torch.float32


def test_restarts_are_never_worse_than_the_first_run(tiny_cnn, batch):
    x, y = batch
    tiny_cnn.eval()
    one = _seeded(7, PGD(0.05, steps=2), tiny_cnn, x, y)
    many = _seeded(7, PGD(0.05, steps=2, restarts=4), tiny_cnn, x, y)
    wrong_one, wrong_many = one.predictions != y, many.predictions != y
    assert (wrong_many >= wrong_one).all()
    same = wrong_one == wrong_many
    assert (many.loss[same] >= one.loss[same] - 1e-6).all()


def test_fast_call_path_equals_run(tiny_cnn, batch):
    x, y = batch
    tiny_cnn.eval()
    torch.manual_seed(2)
    fast = PGD(0.1, steps=3)(tiny_cnn, x, y)
    torch.manual_seed(2)
    assert torch.equal(fast, PGD(0.1, steps=3).run(tiny_cnn, x, y).x_adv)


def test_losses_match_their_formulas():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 5.0, 1.0]])
    y = torch.tensor([0, 1])
    # margin: best other logit minus the true one
    assert torch.allclose(AF.margin_loss(logits, y), torch.tensor([1.0 - 3.0, 5.0 - 2.0]))
    # DLR: -(z_y - max_other) / (z_pi1 - z_pi3)
    expected = torch.tensor([-(3.0 - 1.0) / (3.0 - 0.0), -(2.0 - 5.0) / (5.0 - 1.0)])
    assert torch.allclose(AF.dlr_loss(logits, y), expected)
    assert torch.allclose(AF.per_example_loss("ce")(logits, y), F.cross_entropy(logits, y, reduction="none"))


def test_fgsm_step_defaults():
    assert FGSM(0.1).step_size == pytest.approx(0.1)
    assert FGSM(0.1, random_start=True).step_size == pytest.approx(0.125)  # Wong et al.: 1.25 eps
    assert PGD(8 / 255, steps=10).step_size == pytest.approx(2 / 255)  # 2.5 eps / K


@pytest.mark.parametrize("kwargs,name", [
    ({"eps": 0.0}, "eps"), ({"eps": 0.1, "steps": 0}, "steps"), ({"eps": 0.1, "step_size": -1.0}, "step_size"),
    ({"eps": 0.1, "norm": "l1"}, "norm"), ({"eps": 0.1, "loss": "hinge"}, "loss"),
    ({"eps": 0.1, "bn_mode": "frozen"}, "bn_mode"), ({"eps": 0.1, "restarts": 0}, "restarts"),
    ({"eps": 0.1, "fosc_threshold": -0.5}, "fosc_threshold"),
    ({"eps": 0.1, "fosc_reference": "origin"}, "fosc_reference"),
])
def test_bad_arguments_are_rejected_by_name(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PGD(**kwargs)


def test_attack_holds_no_model_or_parameters(tiny_cnn, batch):
    attack = PGD(0.1, steps=2)
    assert not isinstance(attack, nn.Module)
    assert not any(isinstance(v, (nn.Module, torch.Tensor)) for v in vars(attack).values())


def test_gaussian_start_is_small_unprojected_noise():
    """TRADES / MART start: x + std * N(0, 1), not clipped to [0, 1] before the first step."""
    x = torch.cat([torch.zeros(32, 1, 8, 8), torch.ones(32, 1, 8, 8)])
    delta = AF.gaussian_start(x, 0.001)
    assert delta.shape == x.shape
    assert delta.std().item() == pytest.approx(0.001, rel=0.05) and delta.mean().abs() < 1e-4
    assert (x + delta).min() < 0 and (x + delta).max() > 1  # no box projection
    torch.manual_seed(4)
    first = AF.gaussian_start(x, 0.001)
    torch.manual_seed(4)
    assert torch.equal(first, 0.001 * torch.randn(x.shape))  # the official draw: 0.001 * randn


@pytest.mark.parametrize("norm,eps", NORM_CASES)
def test_pgd_gaussian_start_feeds_the_first_step_then_projects(tiny_cnn, batch, norm, eps):
    x, y = batch
    x = x.clone()
    x[:, :, 0] = 0.0  # pixels on the box's faces, where an unprojected start leaves [0, 1]
    x[:, :, -1] = 1.0
    seen = []
    tiny_cnn.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    torch.manual_seed(9)
    x_adv = PGD(eps, steps=3, norm=norm, start_std=0.001)(tiny_cnn, x, y)
    torch.manual_seed(9)
    assert torch.equal(seen[0], x + AF.gaussian_start(x, 0.001))
    assert seen[0].min() < 0 and seen[0].max() > 1
    for later in (*seen[1:], x_adv):  # every later iterate is projected onto the ball and the box
        assert later.min() >= 0 and later.max() <= 1
        assert (_dist(later, x, norm) <= eps * (1 + 1e-5)).all()
    assert len(seen) == 3 and (_dist(x_adv, x, norm) > 0.5 * eps).any()


def test_pgd_without_start_std_keeps_the_uniform_start(tiny_cnn, batch):
    x, y = batch
    seen = []
    tiny_cnn.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    torch.manual_seed(9)
    PGD(0.1, steps=1)(tiny_cnn, x, y)
    torch.manual_seed(9)
    assert torch.equal(seen[0], x + AF.random_start(x, 0.1, "linf"))
    seen.clear()
    PGD(0.1, steps=1, random_start=False, start_std=0.001)(tiny_cnn, x, y)
    assert torch.equal(seen[0], x)  # start_std only matters with random_start


@pytest.mark.parametrize("value", [0.0, -0.001])
def test_bad_start_std_is_rejected_by_name(value):
    with pytest.raises(ValueError, match="start_std"):
        PGD(0.1, start_std=value)
