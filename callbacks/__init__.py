"""Schedules and safeguards as Lightning callbacks (installed as ``lit_robust.callbacks``).

Each keeps its state in checkpoints (``state_dict`` / ``load_state_dict``), so a resumed run
continues as if it had never stopped.
"""

from lit_robust.callbacks.adversarial_training import AdversarialTraining
from lit_robust.callbacks.catastrophic_overfitting import CatastrophicOverfittingMonitor
from lit_robust.callbacks.coreset import AdversarialCoresetSelection
from lit_robust.callbacks.early_stopping import RobustEarlyStopping, robust_checkpoint
from lit_robust.callbacks.ema import EMA
from lit_robust.callbacks.exact_resume import ExactResume
from lit_robust.callbacks.example_logger import AdversarialExampleLogger
from lit_robust.callbacks.feature_purification import FeaturePurificationProbe
from lit_robust.callbacks.fosc import FOSCSchedule
from lit_robust.callbacks.piecewise_lr import PiecewiseLinearLR
from lit_robust.callbacks.resolution import ResolutionSchedule
from lit_robust.callbacks.robust_evaluation import RobustEvaluation
from lit_robust.callbacks.schedules import AttackSchedule, AttackStepsSchedule, EpsilonSchedule
from lit_robust.callbacks.timm_weights import TimmPretrainedWeights
from lit_robust.callbacks.weights_from_checkpoint import WeightsFromCheckpoint

__all__ = ["AdversarialCoresetSelection", "AdversarialExampleLogger", "AdversarialTraining", "AttackSchedule",
           "AttackStepsSchedule", "CatastrophicOverfittingMonitor", "EMA", "EpsilonSchedule", "ExactResume",
           "FOSCSchedule", "FeaturePurificationProbe", "PiecewiseLinearLR", "ResolutionSchedule", "RobustEarlyStopping",
           "RobustEvaluation", "TimmPretrainedWeights", "WeightsFromCheckpoint", "robust_checkpoint"]
