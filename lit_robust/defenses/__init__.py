"""One LightningModule per defense, all built on ``AdversarialModule``.

``DEFENSES`` maps each public defense name to its class (the contract tests run over it);
``CERTIFIED_DEFENSES`` holds the ones trained for certificates (bounds or randomized smoothing),
which have no adversarial batch and are tested by their own contract.
"""

from lit_robust.objectives.awp import WeightPerturbation
from lit_robust.defenses.atas import ATAS
from lit_robust.defenses.base import AdversarialModule, TrainingOutput
from lit_robust.defenses.certified import CertifiedTraining
from lit_robust.defenses.deat import DEAT
from lit_robust.defenses.fast_at import FastAT
from lit_robust.defenses.fgsm_sdi import FGSMSDI
from lit_robust.defenses.free_at import FreeAT
from lit_robust.defenses.gls import GaussianLossSmoothing
from lit_robust.defenses.grad_align import GradAlign
from lit_robust.defenses.interpolated_at import InterpolatedAT
from lit_robust.defenses.jacobian import JacobianPGDAT, JacobianRegularized, JacobianTRADES
from lit_robust.defenses.mart import MART
from lit_robust.defenses.nfgsm import NFGSM
from lit_robust.defenses.mtl_ibp import MTLIBP
from lit_robust.defenses.oat import OATPGDAT, OATTRADES, OODAugmentedTraining
from lit_robust.defenses.pgd_at import PGDAT
from lit_robust.defenses.rlat import RLAT
from lit_robust.defenses.robust_mixup import RobustMixup
from lit_robust.defenses.sabr import SABR
from lit_robust.defenses.taps import TAPS
from lit_robust.defenses.smoothing import GaussianAugmentation, SmoothedClassifierModule, SmoothMix
from lit_robust.defenses.standard import StandardTraining
from lit_robust.defenses.trades import TRADES
from lit_robust.defenses.union import UnionAT
from lit_robust.defenses.zerograd import MultiGrad, ZeroGrad

DEFENSES: dict[str, type[AdversarialModule]] = {
    "PGDAT": PGDAT,
    "StandardTraining": StandardTraining,
    "TRADES": TRADES,
    "MART": MART,
    "FastAT": FastAT,
    "FreeAT": FreeAT,
    "DEAT": DEAT,
    "InterpolatedAT": InterpolatedAT,
    "RobustMixup": RobustMixup,
    "FGSMSDI": FGSMSDI,
    "UnionAT": UnionAT,
    "OATPGDAT": OATPGDAT,
    "OATTRADES": OATTRADES,
    "JacobianPGDAT": JacobianPGDAT,
    "JacobianTRADES": JacobianTRADES,
    "RLAT": RLAT,
    "NFGSM": NFGSM,
    "GradAlign": GradAlign,
    "ZeroGrad": ZeroGrad,
    "MultiGrad": MultiGrad,
    "ATAS": ATAS,
}
"""Every empirical defense by its public name (trained against an attack); the contract tests run over it."""

CERTIFIED_DEFENSES: dict[str, type[AdversarialModule]] = {
    "CertifiedTraining": CertifiedTraining,
    "GaussianLossSmoothing": GaussianLossSmoothing,
    "SABR": SABR,
    "MTLIBP": MTLIBP,
    "TAPS": TAPS,
    "GaussianAugmentation": GaussianAugmentation,
    "SmoothMix": SmoothMix,
}
"""The defenses trained for certificates (interval bounds or randomized smoothing), tested by their own contract."""

__all__ = ["CERTIFIED_DEFENSES", "DEFENSES", "AdversarialModule", "JacobianRegularized", "OODAugmentedTraining",
           "SmoothedClassifierModule", "TrainingOutput",
           "WeightPerturbation", *DEFENSES, *CERTIFIED_DEFENSES]
