"""Inner maximization: parameter-free attacks called as ``attack(model, x, y)``.

``lit_robust.attacks.functional`` holds the pieces (projection, starts, steps, FOSC, losses)
for people embedding an attack in their own ``training_step``.
"""

from lit_robust.attacks import functional
from lit_robust.attacks.adam import AdamAscent
from lit_robust.attacks.apgd_train import APGDTrain
from lit_robust.attacks.functional import fosc
from lit_robust.attacks.pgd import FGSM, PGD, Attack, AttackResult, module_mode
from lit_robust.attacks.smoothed import smoothmix_attack
from lit_robust.attacks.trades import TradesKLAttack
from lit_robust.attacks.union import MSD, L1PGD, WorstOfAttacks, union_attacks, union_correct

__all__ = ["APGDTrain", "AdamAscent", "Attack", "AttackResult", "FGSM", "L1PGD", "MSD", "PGD", "TradesKLAttack", "WorstOfAttacks",
           "fosc", "functional", "module_mode", "smoothmix_attack", "union_attacks", "union_correct"]
