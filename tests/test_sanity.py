"""Gradient-masking sanity checks: a normal model passes them, deliberately masked models are flagged."""

import copy
import json
import math
import re

import pytest
import torch
from digits_bench import EPS, digits, fit_on_digits, sgd
from torch import nn

from lit_robust.defenses import StandardTraining
from lit_robust.evaluation.sanity import (
    EPS_GRID,
    Check,
    accuracy_vs_eps,
    default_tolerance,
    gradient_masking_checks,
    unbounded_eps,
)
from lit_robust.models import SmallCNN

pytestmark = pytest.mark.filterwarnings("ignore:there are .* points with zero gradient")  # pyautoattack's own flag

N = 180  # test digits used; the default tolerance is then 1 / sqrt(180) = 0.075
BUDGET = dict(steps=10, restarts=2, apgd_steps=25, square_queries=300)  # small, for a 2-core CPU
TINY = dict(steps=2, restarts=1, apgd_steps=2, square_queries=5)  # for tests about check 1 only
NAMES = ["deterministic_eval", "iterative_beats_single_step", "more_iterations_do_not_help_the_model",
         "accuracy_decreases_with_eps", "black_box_does_not_beat_white_box", "apgd_ce_vs_dlr",
         "reference_attacks_do_not_beat_pgd"]


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """A standard-trained SmallCNN(width=4): ~97% clean, ~70% at Linf 0.05, ~0% at 0.2."""
    return fit_on_digits(StandardTraining(SmallCNN(width=4), eps=EPS, optimizer=sgd())).model.eval()


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits().splits["test"].tensors
    return x[:N], y[:N]


class Quantised(nn.Module):
    """Rounds its input to {0, 0.5, 1} first: the input gradient is zero almost everywhere."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 2) / 2)


class Saturated(nn.Module):
    """Logits times 1e4: softmax is one-hot in fp32, so cross-entropy gradients vanish."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x) * 1e4


class Noisy(nn.Module):
    """Gaussian noise on the input in every forward pass, eval mode included."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model((x + 0.05 * torch.randn_like(x)).clamp(0, 1))


def by_name(checks: list[Check]) -> dict[str, Check]:
    assert [c.name for c in checks] == NAMES
    return {c.name: c for c in checks}


@pytest.fixture(scope="module")
def normal_checks(model, data) -> dict[float, dict[str, Check]]:
    """The checks on the normal model at Linf 0.05 (partly robust) and 0.2 (robustness gone)."""
    return {eps: by_name(gradient_masking_checks(model, *data, eps, **BUDGET)) for eps in (0.05, EPS)}


@pytest.mark.parametrize("eps", [0.05, EPS])
def test_normal_model_passes_every_check(normal_checks, eps):
    checks = normal_checks[eps]
    assert {name: c.status for name, c in checks.items()} == dict.fromkeys(NAMES, "pass")
    tol = 1 / math.sqrt(N)
    assert all(c.numbers["tolerance"] == pytest.approx(tol) for c in list(checks.values())[1:])
    step = checks["iterative_beats_single_step"].numbers
    assert step["clean_acc"] > 0.9 and step["pgd_acc"] <= step["fgsm_acc"] < step["clean_acc"]
    curve = checks["accuracy_decreases_with_eps"].numbers
    assert curve["acc@0"] == step["clean_acc"] and curve[f"acc@{eps:.4g}"] == step["pgd_acc"]
    assert curve["unbounded_eps"] == 1.0 and curve["unbounded_acc"] == 0.0
    # the curve (the report's too) is PGD-steps at the EPS_GRID multiples below the unbounded eps, then that eps
    measured = checks["accuracy_decreases_with_eps"].curve
    assert list(measured) == sorted({m * eps for m in EPS_GRID if m * eps < 1} | {1.0}) and curve["steps"] == 10
    assert measured[eps] == step["pgd_acc"] and measured[0] == step["clean_acc"] and measured[1.0] == 0.0
    square = checks["black_box_does_not_beat_white_box"].numbers
    assert square["worst_case_acc"] <= square["whitebox_acc"] <= step["pgd_acc"]
    assert square["square_acc"] >= square["worst_case_acc"]
    if eps == 0.05:  # a number between 0 and clean accuracy, so the comparisons mean something
        assert 0.4 < step["pgd_acc"] < 0.9
        assert abs(checks["apgd_ce_vs_dlr"].numbers["gap"]) <= tol


def test_quantised_input_is_flagged(model, data):
    masked = Quantised(model).eval()
    checks = by_name(gradient_masking_checks(masked, *data, EPS, **BUDGET))
    step, curve = checks["iterative_beats_single_step"].numbers, checks["accuracy_decreases_with_eps"].numbers
    square = checks["black_box_does_not_beat_white_box"].numbers
    # zero gradients: FGSM does nothing and PGD hardly beats its random start ...
    assert step["fgsm_acc"] == step["clean_acc"] and step["pgd_acc"] > step["clean_acc"] - 0.15
    # ... while Square, which only queries the model, breaks it, and the unbounded attack fails
    assert checks["black_box_does_not_beat_white_box"].status == "warn"
    assert square["square_acc"] < 0.2 and square["square_only_fraction"] > 0.5
    assert checks["accuracy_decreases_with_eps"].status == "warn" and curve["unbounded_acc"] > 0.2
    assert checks["deterministic_eval"].status == "pass"


def test_saturated_logits_are_flagged(model, data):
    masked = Saturated(model).eval()
    checks = by_name(gradient_masking_checks(masked, *data, EPS, **BUDGET))
    dlr = checks["apgd_ce_vs_dlr"]
    assert dlr.status == "warn" and "APGD-CE" in dlr.message
    assert dlr.numbers["apgd_ce_acc"] > 0.8 and dlr.numbers["apgd_dlr_acc"] < 0.1  # DLR is scale-invariant
    assert dlr.numbers["gap"] == pytest.approx(dlr.numbers["apgd_ce_acc"] - dlr.numbers["apgd_dlr_acc"])
    assert checks["black_box_does_not_beat_white_box"].numbers["square_acc"] < 0.1  # Square's margin loss works
    assert checks["deterministic_eval"].status == "pass"
    # PGD (cross-entropy, fixed steps) is fooled too, and the reference attack shows by how much
    reference = checks["reference_attacks_do_not_beat_pgd"]
    assert reference.status == "warn" and "APGD-DLR" in reference.message and "report the worst case" in reference.message
    assert reference.numbers["gap"] == pytest.approx(reference.numbers["pgd_acc"] - dlr.numbers["apgd_dlr_acc"])


def test_randomised_model_fails_the_determinism_check(model, data):
    check = gradient_masking_checks(Noisy(model).eval(), *data, EPS, **TINY)[0]
    assert check.name == "deterministic_eval" and check.status == "warn" and "randomised" in check.message
    assert check.numbers["relative_logit_difference"] > 1e-3 and check.numbers["modules_in_train_mode_given"] == 0


def test_model_in_train_mode_is_warned_and_left_as_it_was(model, data):
    x, y = data
    net = copy.deepcopy(model).train()
    net.head[1].weight.requires_grad_(False)  # a frozen layer must stay frozen
    grad_flags = [p.requires_grad for p in net.parameters()]
    state = copy.deepcopy(net.state_dict())
    seen = []
    bn = net.features[1]
    bn.register_forward_hook(lambda m, i, o: seen.append((m.training, i[0].dtype, torch.is_grad_enabled())))
    rng = torch.get_rng_state()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        xi, yi = x.clone(), y.clone()  # inference tensors: the checks must clone out of inference mode
        check = gradient_masking_checks(net, xi, yi, EPS, **TINY)[0]
    assert check.status == "warn" and "model.eval()" in check.message
    assert check.numbers["modules_in_train_mode_given"] == len(list(net.modules()))
    assert check.numbers["modules_in_train_mode_during_checks"] == 0
    assert check.numbers["relative_logit_difference"] == 0  # eval mode is deterministic
    # everything ran in eval mode and fp32, with gradients for the attacks ...
    assert seen and all(not training and dtype == torch.float32 for training, dtype, _ in seen)
    assert any(grad for _, _, grad in seen)
    # ... and the caller's model, flags and RNG are as they were
    assert all(m.training for m in net.modules())
    assert [p.requires_grad for p in net.parameters()] == grad_flags
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())  # BN statistics untouched
    assert all(p.grad is None for p in net.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_two_classes_cannot_run_dlr():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) > 0.5).long()
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 2)).eval()
    checks = gradient_masking_checks(net, x, y, 0.1, **TINY)
    dlr, reference = checks[-2], checks[-1]
    assert dlr.name == "apgd_ce_vs_dlr" and dlr.status == "warn" and "not run" in dlr.message
    assert dlr.numbers["num_classes"] == 2
    assert reference.name == "reference_attacks_do_not_beat_pgd" and "APGD-CE" in reference.message  # CE alone


def test_accuracy_vs_eps_starts_at_clean_accuracy_and_falls(model, data):
    x, y = data
    eps_values = [0, 0.02, 0.05, 0.1, EPS, 1.0]
    rng = torch.get_rng_state()
    curve = accuracy_vs_eps(model, x, y, eps_values, steps=10)
    assert torch.equal(torch.get_rng_state(), rng)
    assert list(curve) == [float(e) for e in eps_values]
    with torch.no_grad():
        assert curve[0.0] == (model(x).argmax(1) == y).double().mean().item()
    accs = list(curve.values())
    assert all(later <= earlier for earlier, later in zip(accs, accs[1:])), accs
    assert accs[0] > 0.9 and accs[-1] == 0.0
    assert accuracy_vs_eps(model, x, y, eps_values, steps=10) == curve  # seeded: reproducible
    l2 = accuracy_vs_eps(model, x, y, [0.5, unbounded_eps(x, "l2")], norm="l2", steps=10)
    assert unbounded_eps(x, "l2") == 8.0 and l2[8.0] == 0.0 < l2[0.5]


def test_progress_bar_names_each_attack_with_its_accuracy_and_is_off_without_a_terminal(model, data, capsys):
    gradient_masking_checks(model, *data, EPS, **TINY, progress=True)
    accuracy_vs_eps(model, *data, [0.0, 0.1], steps=2, progress=True)
    bars = capsys.readouterr().err
    for stage in ("sanity: FGSM", "sanity: PGD-2", "sanity: PGD-10", "sanity: APGD-CE", "sanity: APGD-DLR",
                  "sanity: Square", "sanity: PGD-2 eps 0.6", "PGD-2 eps 0.1"):
        assert stage in bars, stage
    assert re.search(r"acc=\d+\.\d%", bars)
    gradient_masking_checks(model, *data, EPS, **TINY)  # progress=None: a bar only where stderr is a terminal
    accuracy_vs_eps(model, *data, [0.0, 0.1], steps=2)
    assert capsys.readouterr().err == ""


def test_checks_serialise_to_json(normal_checks):
    checks = list(normal_checks[0.05].values())
    loaded = json.loads(json.dumps([c.to_dict() for c in checks]))
    assert [d["name"] for d in loaded] == NAMES
    assert all(d["status"] in ("pass", "warn") and d["passed"] is (d["status"] == "pass") for d in loaded)
    assert loaded[1]["numbers"] == checks[1].numbers
    warned = Check("x", False, {"a": torch.tensor(0.5).item()}, "m")
    assert warned.status == "warn" and json.dumps(warned.to_dict())


def test_default_tolerance():
    assert default_tolerance(100) == pytest.approx(0.1)
    assert default_tolerance(400) == pytest.approx(0.05)
    assert default_tolerance(10**6) == 0.01


def test_bad_arguments_are_rejected(model, data):
    x, y = data
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        gradient_masking_checks(model, x * 2, y, EPS)
    with pytest.raises(ValueError, match="eps"):
        gradient_masking_checks(model, x, y, 0.0)
    with pytest.raises(ValueError, match="norm"):
        gradient_masking_checks(model, x, y, EPS, norm="l1")
    with pytest.raises(ValueError, match="tolerance"):
        gradient_masking_checks(model, x, y, EPS, tolerance=1.5)
    with pytest.raises(ValueError, match="steps"):
        gradient_masking_checks(model, x, y, EPS, steps=0)
    with pytest.raises(ValueError, match="labels must be one class index per image"):
        gradient_masking_checks(model, x, y[:-1], EPS)
    with pytest.raises(ValueError, match="non-finite"):
        gradient_masking_checks(model, x.clone().index_fill_(0, torch.tensor([0]), float("nan")), y, EPS)
    with pytest.raises(ValueError, match="images"):
        gradient_masking_checks(model, x.flatten(1), y, EPS)
    with pytest.raises(ValueError, match="eps_values"):
        accuracy_vs_eps(model, x, y, [0.1, -0.1])
