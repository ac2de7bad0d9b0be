"""Reference AutoAttack (threat model, eval mode and fp32, its place in ``trainer.test``), ``evaluate()``'s
eval mode and eps curve, and the progress bars of the evaluation."""

import functools
import importlib
import io
import json
import logging
import re
import sys

import lightning.pytorch as L
import pytest
import torch

from lit_robust.datamodules import DigitsDataModule
from lit_robust.defenses import StandardTraining
from lit_robust.evaluation import attack_batch, autoattack, evaluate, evaluate_robustness
from lit_robust.evaluation.sanity import EPS_GRID, gradient_masking_checks
from lit_robust.models import SmallCNN

evaluate_module = importlib.import_module("lit_robust.evaluation.evaluate")  # the package's `evaluate` is the function


class Terminal(io.StringIO):
    """A stderr that says it is a terminal: where progress=None shows bars."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def trained():
    """A quickly trained standard model and a small digits test split (54 images)."""
    L.seed_everything(0)
    dm = DigitsDataModule(batch_size=64, eval_batch_size=64, test_size=54)
    module = StandardTraining(SmallCNN(width=4), eps=0.2, val_attack_steps=2, test_attack_steps=5,
                              test_autoattack=True, optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    trainer = L.Trainer(accelerator="cpu", max_epochs=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, dm)
    return trainer, module, dm


def test_autoattack_respects_threat_model_and_runs_in_eval_fp32(trained):
    _, module, dm = trained
    model = module.model.train()
    x, y = dm.splits["test"].tensors
    seen = []
    model.features[1].register_forward_hook(lambda m, i, o: seen.append((m.training, i[0].dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = autoattack(model, x, y, eps=0.2)
    assert all(m.training for m in model.modules())  # flags restored
    assert seen and all(flag is False and dtype == torch.float32 for flag, dtype in seen)
    assert (x_adv - x).abs().max() <= 0.2 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    model.eval()
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean()
        robust = (model(x_adv).argmax(1) == y).float().mean()
    assert clean > 0.8 and robust < 0.1  # a standard model collapses under AutoAttack at eps 0.2


def test_trainer_test_logs_autoattack_and_per_example_worst_case(trained):
    trainer, module, dm = trained
    result = trainer.test(module, dm, verbose=False)[0]
    assert set(result) == {"test/clean_acc", "test/robust_acc", "test/autoattack_acc", "test/worst_case_acc"}
    assert result["test/worst_case_acc"] <= min(result["test/robust_acc"], result["test/autoattack_acc"])
    assert result["test/autoattack_acc"] < result["test/clean_acc"]


def test_autoattack_rejects_bad_arguments(trained):
    _, module, dm = trained
    x, y = dm.splits["test"].tensors
    with pytest.raises(ValueError, match="eps"):
        autoattack(module.model, x, y, eps=0.0)
    with pytest.raises(ValueError, match="norm"):
        autoattack(module.model, x, y, eps=0.1, norm="l1")


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory):
    """``evaluate`` of the trained model handed over in train mode, at eps 0.1 (3 x 0.1 is 0.30000000000000004),
    with the sanity checks on a small budget (PGD-5)."""
    _, module, dm = trained
    model = module.model.train()
    x, y = dm.splits["test"].tensors
    out = tmp_path_factory.mktemp("report")
    small = functools.partial(gradient_masking_checks, steps=5, restarts=1, apgd_steps=5, square_queries=20)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate_module, "gradient_masking_checks", small)
        results = evaluate(model, (x[:24], y[:24]), out, eps=0.1, tiers="pgd", sanity_examples=24)
    return results, model, out


def test_evaluate_runs_a_train_mode_model_in_eval_mode_and_says_so(evaluated):
    results, model, out = evaluated
    determinism = results["sanity"][0]
    assert determinism["name"] == "deterministic_eval" and determinism["status"] == "pass", determinism["message"]
    assert determinism["numbers"]["modules_in_train_mode_given"] == 0
    assert all(m.training for m in model.modules())  # the caller's flags are back
    metadata = json.loads((out / "report.json").read_text())["metadata"]
    assert metadata["model_mode"] == f"eval, set by evaluate ({len(list(model.modules()))} modules given in train " \
                                     "mode; flags restored afterwards)"


def test_the_eps_curve_is_the_sanity_checks_own_pgd_curve_on_one_grid(evaluated):
    results, _, out = evaluated
    curve = results["eps_curve"]
    assert curve["attack"] == "PGD-5" and list(curve["accuracy"]) == [m * 0.1 for m in EPS_GRID]
    measured = next(c for c in results["sanity"] if c["name"] == "accuracy_decreases_with_eps")["numbers"]
    assert curve["accuracy"] == {e: measured[f"acc@{e:.4g}"] for e in curve["accuracy"]}  # measured once
    text = (out / "report.json").read_text()
    assert "0000000000" not in text and "9999999999" not in text  # no float noise (3 * 0.1, float32 means)
    report = json.loads(text)
    assert report["eps_curve"]["attack"] == "PGD-5"
    assert [p["eps"] for p in report["eps_curve"]["points"]] == [0.0, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4]
    assert "| eps | PGD-5 accuracy |" in (out / "report.md").read_text()


def test_tiers_and_autoattack_show_progress_where_asked_and_never_in_the_trainers_path(trained, capsys, caplog,
                                                                                        monkeypatch):
    _, module, dm = trained
    model = module.model.eval()
    x, y = (t[:8] for t in dm.splits["test"].tensors)
    logger = logging.getLogger("auto-attack")
    level = logger.level
    evaluate_robustness(model, (x, y), 0.2, tiers=("pgd", "autoattack"), progress=True)
    bars = capsys.readouterr().err
    for text in ("robustness: pgd", "robustness: autoattack", "autoattack apgd-ce", "/8 "):
        assert text in bars, text
    assert re.search(r"worst-case acc=\d+\.\d%", bars) and re.search(r" acc=\d+\.\d%", bars)
    # the bar reads AutoAttack's debug log, which its handlers still do not see
    assert logger.level == level and not [r for r in caplog.records if r.levelno < logging.WARNING]

    evaluate_robustness(model, (x, y), 0.2, tiers="pgd")  # progress=None, stderr no terminal: no bar
    assert capsys.readouterr().err == ""
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    attack_batch(model, x, y, 0.2, tiers=("pgd", "autoattack"))  # what test_step runs: the Trainer has its bar
    assert terminal.getvalue() == ""
    evaluate_robustness(model, (x, y), 0.2, tiers="pgd")
    assert "robustness: pgd" in terminal.getvalue()
