"""Free adversarial training: minibatch replay with a persistent perturbation (Shafahi et al., NeurIPS 2019)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from lit_robust.attacks import functional as AF
from lit_robust.defenses.base import AdversarialModule, TrainingOutput, finite_total, positive_int
from lit_robust.objectives import pgd_at_objective


class FreeAT(AdversarialModule):
    """Shafahi, Najibi, Ghiasi, Xu, Dickerson, Studer, Davis, Taylor & Goldstein,
    "Adversarial Training for Free!", NeurIPS 2019.

    Official code: github.com/ashafahi/free_adv_train (TensorFlow, CIFAR); PyTorch ports:
    github.com/mahyarnajibi/FreeAdversarialTraining (ImageNet) and
    github.com/locuslab/fast_adversarial ``CIFAR10/train_free.py`` (CIFAR).

    Algorithm: ``delta`` starts at 0 and persists across replays *and* batches::

        for each batch (x, y), m = replays times:
            loss = CE(f(clip(x + delta, 0, 1)), y)             # clip: see the deviations below
            one backward pass -> g_theta and g_delta
            theta <- SGD step with g_theta                         # one optimizer step per replay
            delta <- Proj(delta + eps * sign(g_delta))             # Linf ball, then the [0, 1] box

    Every replay is a real optimizer step (``global_step`` counts them, ``m`` per batch) and
    the learning-rate scheduler is stepped per replay, as in the official code. Each pass
    over the data costs m passes of natural training, so the paper's rule is to train
    ``N_epochs / m`` epochs: set ``max_epochs`` to the epochs you would give PGD-AT
    divided by ``replays`` (about 205 / 8 = 26 for the paper's 80,000 replay steps).
    ``Trainer(max_steps=...)`` counts replay steps too; Lightning checks it between batches,
    so a run may end up to ``replays - 1`` steps past it.

    Defaults (CIFAR-10, the TF code's ``config.py``): ``replays`` m = 8, Linf eps 8/255, step
    eps (``step_size=None``), batch 128, SGD lr 0.1, momentum 0.9, weight decay 2e-4, lr x0.1
    at 50% and 75% of the replay steps (40k and 60k of 80k), WRN-32-10 (Madry's model; our
    ``WideResNet(34, 10)`` has the same 5 units per stage). ``configs/cifar10/free_at.yaml``.
    The locuslab port instead uses PreActResNet-18, 10 epochs x 8 replays, a cyclic lr up to
    0.04 and weight decay 5e-4.

    Cost: 1 forward+backward per optimizer step (m per batch); the perturbation's
    gradient comes from the same backward pass as the weights'.

    Reported (CIFAR-10, Linf 8/255, WRN-32-10, official README): Free-8 85.96 clean /
    46.33 PGD-20 (10 restarts) / 46.19 PGD-100 / 46.60 CW-100, 785 minutes; Free-4 87.83 /
    40.73; Free-10 83.94 / 45.94. RobustBench (Shafahi2019Adversarial): 86.11 clean / 41.47
    AutoAttack.

    The perturbation is a plain tensor, not a registered buffer: DDP broadcasts registered
    buffers from rank 0 at every forward, which would overwrite each rank's own
    perturbations. It is sized to the largest batch seen; a smaller (last) batch uses and
    updates its first rows and leaves the others for the next batch. It is never reset
    during training (the official policy, also not between epochs), except that it restarts
    from zeros when the input shape changes; it is saved in checkpoints, so a resumed run
    continues with it. ``perturb(x, y)`` returns ``x`` plus the current perturbation's first
    rows, projected (zeros where none exists yet); it touches no gradient.

    Deviations we chose:

    * The model sees ``x + delta`` with ``delta`` projected onto the [0, 1] box around the
      current batch before its first replay and after every step, instead of the TF code's
      ``clip(x + delta)`` (the locuslab port projects after each step only). The input is the
      same, but torch's ``clamp`` has a zero gradient on pixels sitting exactly at 0 or 1
      (TF's ``clip_by_value`` does not), which would freeze ``delta`` on every saturated pixel:
      on the digits, where about half the pixels are 0, that weakened Free AT to near nothing.
    * Weight decay acts on every parameter (TF: on conv/fc kernels only).
    * BatchNorm is in train mode for the single forward pass, as in both codes;
      ``attack_bn_mode`` and ``steps`` have no effect here.

    Manual optimization: ``Trainer(gradient_clip_val=...)`` and
    ``Trainer(accumulate_grad_batches=...)`` are not available (Lightning raises), and
    ``ReduceLROnPlateau`` is not supported. Weight-averaging callbacks (EMA) update once per
    batch, not once per replay step. Under DDP each replay's backward all-reduces the
    weight gradients; ``delta``'s gradient stays on its rank.
    """

    def __init__(
        self, model: nn.Module, replays: int = 8, eps: float = 8 / 255, step_size: Optional[float] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, eps=eps, step_size=eps if step_size is None else step_size, **kwargs)
        positive_int(replays, "replays")
        self.replays = int(replays)
        self.automatic_optimization = False
        self._delta: Optional[Tensor] = None  # the persistent perturbation, [largest batch, *image]

    def outer_loss(self, x: Tensor, x_adv: Tensor, y: Tensor) -> TrainingOutput:
        return pgd_at_objective(self.model, x, x_adv, y, self.label_smoothing)

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        """``x`` plus the current persistent perturbation, projected onto the eps-ball and [0, 1]."""
        return (x + AF.project(self._rows(x), x, self.eps, self.norm)).clamp(0.0, 1.0).detach()

    def adversarial_step(self, x: Tensor, y: Tensor, batch_idx: int) -> Tensor:
        opt = self.optimizers()
        scheduler = self._scheduler("step")
        # The carried perturbation is first projected onto this batch's box: the same input as
        # clip(x + delta, 0, 1), but torch's clamp has a zero gradient *at* 0 and 1 (TF's
        # clip_by_value does not), which would freeze delta on every saturated pixel.
        delta, total = AF.project(self._rows(x), x, self.eps, self.norm), 0.0
        for _ in range(self.replays):
            delta.requires_grad_(True)
            out = self.outer_loss(x, x + delta, y)
            opt.zero_grad()
            self.manual_backward(out.loss)  # weight gradients and delta's, from one backward
            self.watch_loss(out.loss)  # before the step: global_step is this replay's index
            opt.step()
            torch.clear_autocast_cache()  # the weights changed in place inside this step
            grad = delta.grad.nan_to_num(0.0)  # a skipped fp16 step must not poison delta
            delta = AF.project(AF.ascent_step(delta.detach(), grad, self.step_size, self.norm), x, self.eps, self.norm)
            if scheduler is not None:
                scheduler.step()
            self._log_accuracy("train/adv_acc", out.adv_logits, y)
            total = total + out.loss.detach()
        self._keep(delta)
        loss = total / self.replays
        self.log_loss(loss, x.shape[0])
        return loss

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        scheduler = self._scheduler("epoch")
        if scheduler is not None:
            scheduler.step()

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if any(config.reduce_on_plateau for config in self.trainer.lr_scheduler_configs):
            raise ValueError("FreeAT steps its scheduler itself and does not support ReduceLROnPlateau")

    def default_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """The TF code's SGD: lr 0.1, momentum 0.9, weight decay 2e-4."""
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=2e-4)

    def default_lr_scheduler(self, optimizer: torch.optim.Optimizer) -> tuple[Any, str]:
        """lr x0.1 at 50% and 75% of the replay steps (40k and 60k of 80k), stepped per replay."""
        total = self.total_replay_steps()
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, [total // 2, total * 3 // 4], 0.1), "step"

    def total_replay_steps(self) -> int:
        """Optimizer steps of the whole fit: batches x epochs x replays, capped by ``max_steps``."""
        # estimated_stepping_batches = min(batches x epochs, max_steps), and max_steps counts
        # optimizer (= replay) steps, so the replay count is min(that x replays, max_steps).
        steps = self.trainer.estimated_stepping_batches * self.replays
        if self.trainer.max_steps != -1:
            steps = min(steps, self.trainer.max_steps)
        return finite_total(steps)

    # --- the persistent perturbation --------------------------------------------------------

    def _rows(self, x: Tensor) -> Tensor:
        """A copy of the perturbation's first ``len(x)`` rows, zeros where there are none yet."""
        kept = self._delta
        if kept is None or kept.shape[1:] != x.shape[1:]:
            return torch.zeros_like(x)
        if kept.device != x.device or kept.dtype != x.dtype:
            kept = self._delta = kept.to(x)
        rows = kept[: len(x)].clone()
        return rows if len(rows) == len(x) else torch.cat([rows, torch.zeros_like(x[len(rows):])])

    def _keep(self, delta: Tensor) -> None:
        kept = self._delta
        if kept is None or kept.shape[1:] != delta.shape[1:] or len(kept) <= len(delta):
            self._delta = delta.detach().clone()
        else:
            kept[: len(delta)] = delta.detach()

    def _scheduler(self, interval: str) -> Optional[Any]:
        configs = self.trainer.lr_scheduler_configs
        return configs[0].scheduler if configs and configs[0].interval == interval else None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["free_at_delta"] = None if self._delta is None else self._delta.cpu()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._delta = checkpoint.get("free_at_delta")
