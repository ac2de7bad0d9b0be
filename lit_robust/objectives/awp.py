"""Adversarial weight perturbation (Wu, Xia & Wang, "Adversarial Weight Perturbation Helps Robust
Generalization", NeurIPS 2020; official code github.com/csdongxian/AWP).

One ascent step on the weights, layer-wise and relative to each weight's norm, before the
outer loss; the weights are restored after the backward pass, so the update is
``w <- w - lr * grad L(w + v)`` with ``v_l = gamma * ||w_l|| * g_l / ||g_l||`` and ``g_l`` the
gradient of the defense's own outer loss at ``w``. Only convolution and linear weights (name
ending in ``weight``, at least 2-D) are perturbed; BatchNorm parameters and biases are not.

How this differs from the official code, and why it is equivalent:

* The official code takes one SGD step on a proxy copy of the model and rescales the weight
  difference; with a single step from zero that difference is ``lr * g``, so after the
  rescaling ``lr`` drops out and the result is the formula above. We skip the copy.
* The proxy exists so that its forward pass does not move BatchNorm running statistics;
  we run the same train-mode forward on the model and put the running statistics back.
* The official code restores after ``optimizer.step()``; we restore right after the
  backward (``on_after_backward``). Identical for SGD/Adam updates, except that coupled weight
  decay is computed at ``w`` rather than ``w + v`` (a difference of ``lr * wd * v``).
* Under DDP each rank perturbs with its own batch's gradient (no extra all-reduce); the
  official single-process code uses the whole batch.

Cost: one extra forward+backward of the outer loss per step (12 F+B for PGD-10 AT).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def perturbable_weights(model: nn.Module) -> list[nn.Parameter]:
    """Convolution and linear weights: trainable, at least 2-D, named ``...weight``."""
    return [p for name, p in model.named_parameters() if p.requires_grad and p.dim() > 1 and name.endswith("weight")]


@contextmanager
def preserved_norm_statistics(model: nn.Module) -> Iterator[None]:
    """Runs the block and then puts every BatchNorm running statistic back as it was."""
    saved = [(buf, buf.clone()) for m in model.modules() if isinstance(m, _BatchNorm) for buf in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


class WeightPerturbation:
    """Applies and removes one AWP step on a model's weights.

    ``apply(model, loss_fn)`` computes the gradient of ``loss_fn()`` with respect to the
    perturbable weights (``torch.autograd.grad``: parameter ``.grad`` is left alone), adds
    ``v_l = gamma * ||w_l|| * g_l / ||g_l||`` to each, and keeps a copy of the weights it changed;
    ``restore()`` copies them back (bit-exact, unlike subtracting ``v``). Both clear the autocast
    weight cache, which would otherwise keep serving casts of the old weights.

    In your own ``training_step`` (what ``awp_gamma`` does in the defenses)::

        self.awp.apply(self.net, lambda: trades_loss(self.net, x, x_adv, y))  # before the loss
        return trades_loss(self.net, x, x_adv, y)
        # and in on_after_backward: self.awp.restore()
    """

    def __init__(self, gamma: float) -> None:
        if not gamma > 0:
            raise ValueError(f"awp_gamma must be > 0 to perturb weights, got {gamma}")
        self.gamma = float(gamma)
        self._applied: list[tuple[nn.Parameter, Tensor]] = []  # (weight, its value before the perturbation)

    @property
    def active(self) -> bool:
        return bool(self._applied)

    def apply(self, model: nn.Module, loss_fn: Callable[[], Tensor]) -> None:
        self.restore()
        weights = perturbable_weights(model)
        with preserved_norm_statistics(model):  # restored after the backward, which reads these buffers
            grads = torch.autograd.grad(loss_fn(), weights, allow_unused=True)
        with torch.no_grad():
            for w, g in zip(weights, grads):
                if g is None:
                    continue
                self._applied.append((w, w.detach().clone()))
                w.add_(g * (self.gamma * w.norm() / (g.norm() + 1e-20)))
        torch.clear_autocast_cache()

    def restore(self) -> None:
        with torch.no_grad():
            for w, saved in self._applied:
                w.copy_(saved)  # not w - v: rounding would differ per rank and DDP replicas would drift apart
        self._applied = []
        torch.clear_autocast_cache()
