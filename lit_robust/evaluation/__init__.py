"""Robustness evaluation you can publish: reference AutoAttack, tiers, sanity checks, CIFAR-10-C, reports, export.

``evaluate(model, data, out_dir)`` runs it all on any ``nn.Module`` mapping [0, 1] images to
logits; ``lit-robust evaluate`` does it for a trained checkpoint; a defense's ``trainer.test``
runs the tiers (``test_apgd``, ``test_autoattack``).
"""

from lit_robust.evaluation.autoattack import autoattack
from lit_robust.evaluation.corruptions import CorruptionResult, corruption_accuracy
from lit_robust.evaluation.evaluate import evaluate
from lit_robust.evaluation.export import classifier_state_dict, export_checkpoint, export_classifier, load_exported
from lit_robust.evaluation.report import write_report
from lit_robust.evaluation.sanity import Check, accuracy_vs_eps, gradient_masking_checks
from lit_robust.evaluation.tiers import TIERS, RobustnessResult, attack_batch, evaluate_robustness

__all__ = ["TIERS", "Check", "CorruptionResult", "RobustnessResult", "accuracy_vs_eps", "attack_batch", "autoattack",
           "classifier_state_dict", "corruption_accuracy", "evaluate", "evaluate_robustness", "export_checkpoint",
           "export_classifier", "gradient_masking_checks", "load_exported", "write_report"]
