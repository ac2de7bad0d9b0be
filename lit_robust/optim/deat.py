"""The DEAT update (Sun, Sinha & Zhang, KDD 2023, Algorithm 2) as a ``torch.optim.Optimizer``.

The update keeps two gradient averages per parameter and feeds them odd and even steps in
turn, so consecutive averages are built from disjoint mini-batches. Combining them with a
positive and a negative weight keeps the expected step (the drift) and enlarges its noise
(the diffusion term), which the paper ties to better robust generalisation. See
:class:`lit_robust.defenses.deat.DEAT` for the method card.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

Params = Union[Iterable[Tensor], Iterable[dict[str, Any]]]


class DEATOptimizer(Optimizer):
    r"""Algorithm 2, line 7-8 of "Enhance Diffusion to Improve Robust Generalization" (DEAT).

    At step :math:`t = 1, 2, \dots` with mini-batch gradient :math:`g_t`::

        h_t     = k2 * h_{t-2} + (1 - k2) * g_t          # the buffer of t's parity
        theta  <- theta - a' * ((1 + k1) * h_t - k1 * h_{t-1})   # h_{t-1}: the other buffer
        a'      = lr / sqrt((1 + k1)^2 + k1^2)

    Both buffers start at zero (``h_{-1} = h_0 = 0``, as in the PNM optimizer that the
    official code calls), so step 1 moves by ``a' (1 + k1)(1 - k2) g_1``. With a constant
    gradient ``g`` the step tends to ``a' g``: per unit of gradient about ``lr / 2.24`` with
    the defaults, some 22 times smaller than SGD with momentum 0.9 at the same ``lr``.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        lr: the outer learning rate :math:`\alpha_O` (the official code's ``lr_max`` is 0.1).
        k1: weight of the negative (previous-parity) buffer; paper Table 1: 1.0 (PNM's
            ``beta2``).
        k2: decay of each buffer; paper Table 1: 0.8. The official code passes PNM
            ``beta1 = 0.9`` and PNM decays by ``beta1**2``, i.e. 0.81; pass ``k2=0.81`` to
            match the code.
        weight_decay: L2 strength (paper Table 1: 5e-4, set by the DEAT module; 0 here).
        decoupled_weight_decay: ``True`` (default, the official code through PNM) shrinks the
            weights, ``theta <- theta * (1 - lr * weight_decay)``, before the update and leaves
            the gradient alone; ``False`` adds ``weight_decay * theta`` to the gradient before
            it enters the buffers (coupled L2, as SGD does in the PGD-AT baseline).
            ``param.grad`` is never modified in either case.

    State per parameter (saved by ``state_dict``): ``step`` (steps this parameter took; it
    chooses the parity), ``h_odd`` and ``h_even`` (the buffers updated at odd and even
    steps). Memory: two parameter-sized buffers, one more than SGD with momentum. A
    parameter without a gradient at some step is skipped and keeps its parity. The update
    uses ``torch._foreach_*`` kernels over each group (multi-tensor on CUDA).
    """

    def __init__(
        self,
        params: Params,
        lr: float,
        k1: float = 1.0,
        k2: float = 0.8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = True,
    ) -> None:
        self.check_arguments(lr, k1, k2, weight_decay)
        defaults = dict(lr=lr, k1=k1, k2=k2, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults)

    @staticmethod
    def check_arguments(lr: float, k1: float, k2: float, weight_decay: float) -> None:
        """Raises ``ValueError`` naming the first argument outside its accepted range."""
        for name, value, ok, accepted in (
            ("lr", lr, lr >= 0, ">= 0"),
            ("k1", k1, k1 >= 0, ">= 0"),
            ("k2", k2, 0 <= k2 < 1, "in [0, 1)"),
            ("weight_decay", weight_decay, weight_decay >= 0, ">= 0"),
        ):
            if not ok:
                raise ValueError(f"{name} must be {accepted}, got {value}")

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, current, previous = [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("DEATOptimizer does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["h_odd"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["h_even"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                mine, other = ("h_odd", "h_even") if state["step"] % 2 else ("h_even", "h_odd")
                params.append(p)
                grads.append(p.grad)
                current.append(state[mine])
                previous.append(state[other])
            if params:
                _deat_update(params, grads, current, previous, group)
        return loss


def _deat_update(params: list[Tensor], grads: list[Tensor], current: list[Tensor], previous: list[Tensor],
                 group: dict[str, Any]) -> None:
    """One Algorithm-2 step for a group: ``current`` holds h_{t-2} (becomes h_t), ``previous`` h_{t-1}."""
    lr, k1, k2, wd = group["lr"], group["k1"], group["k2"], group["weight_decay"]
    if wd != 0 and not group["decoupled_weight_decay"]:
        grads = torch._foreach_add(grads, params, alpha=wd)  # a new list: param.grad stays as it was
    torch._foreach_mul_(current, k2)
    torch._foreach_add_(current, grads, alpha=1 - k2)
    direction = torch._foreach_mul(current, 1 + k1)
    torch._foreach_add_(direction, previous, alpha=-k1)
    if wd != 0 and group["decoupled_weight_decay"]:
        torch._foreach_mul_(params, 1 - lr * wd)
    torch._foreach_add_(params, direction, alpha=-lr / math.sqrt((1 + k1) ** 2 + k1 ** 2))
