"""Tiered robustness evaluation: per-example worst case, agreement with the reference code, no side effects."""

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_robust.evaluation import tiers as T
from lit_robust.evaluation.tiers import TIERS, RobustnessResult, attack_batch, evaluate_robustness
from lit_robust.models import SmallCNN

EPS = 0.3  # on the 4x4 MLP below: APGD-CE leaves one example that APGD-T then fools


@pytest.fixture(autouse=True)
def _one_thread():
    """The attacks here are thousands of tiny ops; a second intra-op thread only adds contention."""
    torch.set_num_threads(1)


def tiny_mlp(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, num_classes))


@pytest.fixture
def mlp_batch():
    """The MLP (in eval mode) and 24 inputs it classifies correctly but for the first four."""
    model = tiny_mlp().eval()
    x = torch.rand(24, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:4] = (y[:4] + 1) % 10
    return model, x, y


class Decoder(nn.Module):
    """Predicts class ``round(9 * x[:, 0, 0, 0])``: clean correctness chosen by the data."""

    def forward(self, x):
        return -(torch.arange(10.0) - 9 * x[:, :1, 0, 0]) ** 2


def test_worst_case_is_the_per_example_and_of_every_attack(monkeypatch):
    y = torch.tensor([1, 2, 3, 4, 5, 6])
    x = torch.zeros(6, 1, 2, 2)
    x[:, 0, 0, 0] = torch.tensor([1, 2, 3, 4, 5, 0]) / 9  # the last one is misclassified clean
    x[:, 0, 1, 1] = torch.arange(6) / 9  # which example it is, whatever the batching
    t, f = True, False
    masks = {
        "pgd": [t, f, t, t, t, t],  # example 1 fooled by PGD only
        "apgd-ce": [t, t, f, t, t, t],  # example 2 by APGD-CE only
        "apgd-t": [t, t, t, f, t, t],
        "autoattack": [t, t, t, t, f, t],
    }
    seen = {}

    def fake(keys):
        def run(model, x, y, clean, eps, norm, seed, n_classes, **options):
            seen[keys] = clean.tolist()
            ids = (x[:, 0, 1, 1] * 9).round().long()
            return {k: torch.tensor(masks[k])[ids] for k in keys}
        return run

    for tier, keys in T.TIER_KEYS.items():
        monkeypatch.setitem(T._TIER_RUNNERS, tier, fake(keys))
    correct = attack_batch(Decoder(), x, y, eps=0.1, tiers=TIERS)
    assert list(correct) == ["clean", "pgd", "apgd-ce", "apgd-t", "autoattack", "worst_case"]
    assert correct["clean"].tolist() == [t, t, t, t, t, f]
    assert seen == {keys: [t, t, t, t, t, f] for keys in T.TIER_KEYS.values()}  # each runner saw the clean mask
    for key, mask in masks.items():  # an example wrong on clean data counts as fooled by every attack
        assert correct[key].tolist() == mask[:5] + [f]
    assert correct["worst_case"].tolist() == [t, f, f, f, f, f]

    correct = attack_batch(Decoder(), x, y, eps=0.1, tiers="pgd")
    assert set(correct) == {"clean", "pgd", "worst_case"} and correct["worst_case"].tolist() == [t, f, t, t, t, f]

    result = evaluate_robustness(Decoder(), (x, y), eps=0.1, tiers=("autoattack", "pgd"), batch_size=4)
    assert result.tiers == ("pgd", "autoattack")  # canonical order, cheapest first
    assert result.accuracy == pytest.approx({"clean": 5 / 6, "pgd": 4 / 6, "autoattack": 4 / 6, "worst_case": 3 / 6})
    summary = json.loads(json.dumps(result.to_dict()))
    assert summary["n_examples"] == 6 and summary["eps"] == 0.1 and summary["norm"] == "linf"
    assert summary["tiers"] == ["pgd", "autoattack"] and summary["accuracy"]["worst_case"] == pytest.approx(0.5)
    assert summary["settings"]["pgd"]["steps"] == 20 and summary["settings"]["autoattack"]["version"] == "standard"


def test_autoattack_tier_equals_the_reference_autoattack(mlp_batch):
    from pyautoattack import AutoAttack

    model, x, y = mlp_batch
    ours = attack_batch(model, x, y, EPS, tiers=("autoattack",))
    _, y_adv = AutoAttack(model, eps=EPS, norm="Linf", version="standard", seed=0).run_standard_evaluation(
        x, y, batch_size=500)
    assert torch.equal(ours["autoattack"], y_adv == y)
    assert torch.equal(ours["worst_case"], ours["autoattack"])


def test_apgd_tier_equals_the_reference_apgd_ce_and_apgd_t(mlp_batch):
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

    model, x, y = mlp_batch
    ours = attack_batch(model, x, y, EPS, tiers=("apgd",))
    common = dict(n_iter=100, norm="Linf", n_restarts=1, eps=EPS, seed=0, device="cpu")
    with torch.no_grad():
        ce = model(APGDAttack(model, loss="ce", **common).perturb(x, y)).argmax(1) == y
        targeted = model(APGDAttack_targeted(model, n_target_classes=9, **common).perturb(x, y)).argmax(1) == y
    assert torch.equal(ours["apgd-ce"], ce) and torch.equal(ours["apgd-t"], targeted)
    assert torch.equal(ours["worst_case"], ce & targeted & ours["clean"])
    assert ours["apgd-t"].sum() < ours["apgd-ce"].sum()  # here APGD-T finds what APGD-CE missed


def test_apgd_tier_on_few_classes_and_autoattack_refusal():
    model = tiny_mlp(num_classes=3).eval()
    x = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    y = torch.zeros(8, dtype=torch.long)
    with pytest.warns(UserWarning, match="APGD-T needs at least 4 classes"):
        correct = attack_batch(model, x, y, 0.1, tiers="apgd")
    assert set(correct) == {"clean", "apgd-ce", "worst_case"}
    with pytest.raises(ValueError, match="tiers.*at least 10 classes"):
        attack_batch(model, x, y, 0.1, tiers="autoattack")


def test_no_side_effects_on_model_flags_gradients_or_rng(mlp_batch):
    model, x, y = mlp_batch
    model.train()
    model[2].eval()  # a submodule the user froze on purpose
    model[1].weight.requires_grad_(False)
    flags = [m.training for m in model.modules()]
    requires = [p.requires_grad for p in model.parameters()]
    seen = []
    model[4].register_forward_hook(
        lambda m, i, o: seen.append((m.training, i[0].dtype, any(p.requires_grad for p in model.parameters()))))
    rng = torch.get_rng_state()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = attack_batch(model, x, y, 0.5, tiers=TIERS, pgd_steps=5)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == flags
    assert [p.requires_grad for p in model.parameters()] == requires
    assert all(p.grad is None for p in model.parameters())
    assert seen and all(s == (False, torch.float32, False) for s in seen)  # eval mode, fp32, parameters frozen
    torch.manual_seed(123)  # the result depends on `seed` only, not on the caller's RNG
    again = attack_batch(model, x, y, 0.5, tiers=TIERS, pgd_steps=5)
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_inference_mode_is_refused_and_inference_tensors_are_cloned(mlp_batch):
    model, x, y = mlp_batch
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="inference_mode"):
            attack_batch(model, x, y, 0.1)
        x_inf, y_inf = x.clone(), y.clone()
    assert torch.equal(attack_batch(model, x_inf, y_inf, 0.1, pgd_steps=3)["pgd"],
                       attack_batch(model, x, y, 0.1, pgd_steps=3)["pgd"])


def test_dataloader_subsets_and_batching(mlp_batch):
    model, _, _ = mlp_batch
    x = torch.rand(50, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = model(x).argmax(1)
    kwargs = dict(eps=0.2, tiers="pgd", pgd_steps=5, batch_size=16)
    full = evaluate_robustness(model, (x, y), **kwargs)
    extra = TensorDataset(x, y, torch.zeros(50))  # (x, y, *extra) batches, batched otherwise than batch_size
    loader = evaluate_robustness(model, DataLoader(extra, batch_size=7), **kwargs)
    assert isinstance(loader, RobustnessResult) and loader.n_examples == 50
    assert all(torch.equal(full.correct[k], loader.correct[k]) for k in full.correct)
    assert torch.equal(loader.indices, torch.arange(50))

    first = evaluate_robustness(model, DataLoader(extra, batch_size=7), n_examples=20, **kwargs)
    assert first.n_examples == 20 and torch.equal(first.indices, torch.arange(20))
    head = evaluate_robustness(model, (x[:20], y[:20]), **kwargs)
    assert all(torch.equal(first.correct[k], head.correct[k]) for k in head.correct)

    subset = evaluate_robustness(model, DataLoader(extra, batch_size=7), n_examples=20, subset_seed=5, **kwargs)
    same = evaluate_robustness(model, (x, y), n_examples=20, subset_seed=5, **kwargs)
    other = evaluate_robustness(model, (x, y), n_examples=20, subset_seed=6, **kwargs)
    assert torch.equal(subset.indices, same.indices) and not torch.equal(subset.indices, other.indices)
    assert not torch.equal(subset.indices, torch.arange(20)) and len(subset.indices.unique()) == 20
    picked = evaluate_robustness(model, (x[subset.indices], y[subset.indices]), **kwargs)
    assert all(torch.equal(subset.correct[k], picked.correct[k]) for k in picked.correct)
    assert subset.settings["subset_seed"] == 5 and subset.settings["n_examples_requested"] == 20

    with pytest.warns(UserWarning, match="only 50"):
        assert evaluate_robustness(model, (x, y), n_examples=80, **kwargs).n_examples == 50
    with pytest.warns(UserWarning, match="shuffling"):
        evaluate_robustness(model, DataLoader(extra, batch_size=25, shuffle=True), **kwargs)


def test_standard_model_on_digits_collapses_under_attack(digits):
    x, y = digits.splits["train"].tensors
    model = SmallCNN(width=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        for idx in torch.randperm(len(y), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    test = digits.test_dataloader()
    result = evaluate_robustness(model, test, eps=0.2, tiers=("pgd", "autoattack"), n_examples=64, batch_size=64)
    acc = result.accuracy
    assert acc["clean"] > 0.8 and acc["worst_case"] < 0.1 and acc["autoattack"] < 0.1
    assert acc["worst_case"] <= min(acc["pgd"], acc["autoattack"])
    tiny = evaluate_robustness(model, test, eps=1e-3, tiers="pgd", n_examples=64, batch_size=64).accuracy
    assert tiny["worst_case"] >= tiny["clean"] - 0.05  # a negligible budget leaves it almost untouched


def test_default_eps_follows_robustbench(monkeypatch):
    monkeypatch.setitem(T._TIER_RUNNERS, "pgd", lambda model, x, y, clean, *a, **k: {"pgd": clean})
    x, y = torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long)
    assert evaluate_robustness(Decoder(), (x, y), tiers="pgd").eps == pytest.approx(8 / 255)
    assert evaluate_robustness(Decoder(), (x, y), norm="l2", tiers="pgd").eps == 0.5


@pytest.mark.parametrize("kwargs, name", [
    (dict(tiers=("pgd", "fab")), "tiers"),
    (dict(tiers=()), "tiers"),
    (dict(eps=0.0), "eps"),
    (dict(eps=-0.1), "eps"),
    (dict(eps=float("nan")), "eps"),
    (dict(norm="l1"), "norm"),
    (dict(n_examples=0), "n_examples"),
    (dict(n_examples=2, subset_seed=None, batch_size=0), "batch_size"),
    (dict(subset_seed=3), "subset_seed"),
    (dict(pgd_steps=0), "pgd_steps"),
    (dict(pgd_restarts=1.5), "pgd_restarts"),
    (dict(autoattack_version="fast"), "autoattack_version"),
    (dict(seed=0.5), "seed"),
])
def test_bad_arguments_are_named(kwargs, name):
    x, y = torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=name):
        evaluate_robustness(Decoder(), (x, y), **{"tiers": "pgd", **kwargs})


def test_bad_inputs_are_refused():
    x, y = torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        attack_batch(Decoder(), x + 2, y, 0.1)
    with pytest.raises(ValueError, match="model.*fp32"):
        attack_batch(tiny_mlp().to(torch.bfloat16), torch.zeros(2, 1, 4, 4), y, 0.1)
    with pytest.raises(ValueError, match=r"one class index per image, shape \(2,\), or probability rows .* got \(1,\)"):
        attack_batch(Decoder(), x, y[:1], 0.1)
    with pytest.raises(ValueError, match="robustness evaluation needs class labels"):
        attack_batch(Decoder(), x, torch.full((2, 4), 0.25), 0.1)
    with pytest.raises(ValueError, match="a batch must be a tuple or list"):
        evaluate_robustness(Decoder(), [x, x, x], eps=0.1, tiers="pgd")
    with pytest.raises(ValueError, match="no examples"):
        evaluate_robustness(Decoder(), [], eps=0.1, tiers="pgd")
