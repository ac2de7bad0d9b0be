"""ATAS: single-step adversarial training with a per-example adaptive step size and a per-example perturbation
carried from epoch to epoch (Huang et al., 2023)."""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_robust.attacks import functional as AF
from lit_robust.attacks.pgd import module_mode
from lit_robust.batches import BatchKey, batch_part, check_batch_key
from lit_robust.checks import inputs_checked
from lit_robust.defenses.base import AdversarialModule, TrainingOutput, finite_total, linf_only, positive_int
from lit_robust.objectives import pgd_at_objective

STATE_KEY = "lit_robust_atas_state"  #: the checkpoint entry holding the per-example perturbations and averages


def atas_step_sizes(grad_norm_ema: Tensor, c: float, scale: float, min_step: float, max_step: float) -> Tensor:
    """Per example ``clamp(scale / (1 + sqrt(ema) / c), min_step, max_step)``: a large input gradient (a sharp loss
    around the example) gets a small step (the official ``get_adv_adaptive_step_size``, whose float operations
    ``1 / (1 + sqrt(ema) / c) * 16 / 255`` are kept in that order, so the steps equal the official ones bit for bit)."""
    return (1 / (1 + grad_norm_ema.sqrt() / c) * (scale * 255) / 255).clamp(min_step, max_step)


def window_indices(dy: Tensor, dx: Tensor, size: tuple[int, int], padded_width: int) -> Tensor:
    """Per example ``[B, H * W]``: the flat positions, in a padded image of width ``padded_width``, of the ``H x W``
    window whose top-left corner is ``(dy, dx)``."""
    h, w = size
    rows = dy[:, None, None] + torch.arange(h, device=dy.device)[None, :, None]
    cols = dx[:, None, None] + torch.arange(w, device=dx.device)[None, None, :]
    return (rows * padded_width + cols).flatten(1)


def crop_flip(padded: Tensor, where: Tensor, mirrored: Tensor, size: tuple[int, int]) -> Tensor:
    """The windows ``where`` (:func:`window_indices`) of the padded batch, mirrored left-right where ``mirrored``."""
    b, ch = padded.shape[:2]
    out = padded.flatten(2).gather(2, where[:, None, :].expand(b, ch, -1)).view(b, ch, *size)
    return torch.where(mirrored[:, None, None, None], out.flip(3), out)


def uncrop_into(padded: Tensor, window: Tensor, where: Tensor, mirrored: Tensor) -> Tensor:
    """``padded`` with each example's window ``where`` replaced by ``window`` un-mirrored: the inverse of
    :func:`crop_flip` (the official ``inverse_aug``); the rest of the padded image is kept."""
    b, ch = padded.shape[:2]
    window = torch.where(mirrored[:, None, None, None], window.flip(3), window)
    flat = padded.flatten(2).clone()
    flat.scatter_(2, where[:, None, :].expand(b, ch, -1), window.flatten(2).to(flat.dtype))
    return flat.view_as(padded)


class ATAS(AdversarialModule):
    """Huang, Fan, Liu, Zhang, Zhang, Salzmann, Süsstrunk & Wang, "Fast Adversarial Training with Adaptive Step
    Size", IEEE Transactions on Image Processing 2023 (arXiv 2206.02417; cited in the issue as ICLR 2023).

    Official code: github.com/HuangZhiChao95/ATAS (``ATAS.py``: ``train``, ``main``; ``adv_attack.py``:
    ``get_adv_adaptive_step_size``, ``get_adv_constant_step_size``; ``data_aug.py``: ``aug``, ``aug_trans``,
    ``inverse_aug``; ``data.py``: ``IndexDataset``, ``Pad(4)``; ``ATAS_CIFAR.sh``).

    Every training example ``i`` keeps a perturbation ``delta_i`` (on the zero-padded image, so it follows the
    random crop and flip) and a moving average ``v_i`` of its squared input-gradient norm. Per batch (Linf)::

        crop, flip ~ uniform (pad 4, 9 x 9 offsets; flip with probability 1/2)
        x, d  = crop_flip(pad(x_i)), crop_flip(delta_i)        # the same window and flip for both
        x0    = clamp(x + d, 0, 1)                             # start from the example's last perturbation
        g     = grad_x0 mean-CE(f(x0), y)                      # BN in eval mode; mean over the batch
        after warm-up:  v_i <- beta v_i + (1 - beta) ||g_i||^2
                        alpha_i = clamp(2 (8/255) / (1 + sqrt(v_i) / c), 4/255, 14/255)
        during warm-up: alpha_i = step_size (eps)              # v_i untouched
        x_adv = clamp(Proj_eps(x0 + alpha_i sign(g_i)), 0, 1)
        theta <- theta - lr * grad_theta CE(f(x_adv), y)        # train mode
        delta_i <- uncrop_unflip(x_adv - x) into its window     # the rest of delta_i is kept

    Before epochs 10 and 20 (every ``reset_every``, not before the last) every ``delta_i`` is redrawn from
    ``U(-eps, eps)``; ``v`` starts at 0 and is never reset.

    Defaults (``ATAS_CIFAR.sh``): Linf eps 8/255, ``c = 0.01``, ``beta = 0.5``, steps clamped to [4/255, 14/255]
    with the numerator ``2 * 8/255`` fixed whatever eps (``step_scale``: the official code hard-codes it),
    warm-up 5 epochs at step ``1.0 * eps``, resets every 10 epochs, 30 epochs at batch 128, SGD lr 0.1
    momentum 0.9 weight decay 5e-4, lr x0.1 at epochs 24 and 28 (per iteration). PreActResNet-18 and
    WRN-34-10; CIFAR-100 at 4, 8, 12/255 and ImageNet (ResNet-50, 2 and 4/255) with the same constants. See
    ``configs/cifar10/atas.yaml``.

    Batches must carry each example's index in the training set (``index``, position 2 by default):
    ``ImageDataModule(with_index=True)`` (all lit_robust image DataModules) or any dataset returning
    ``(x, y, i)``. ATAS crops and flips itself (its state follows the window), so the DataModule's own
    augmentation must be off (``augment=False``; checked at fit start for lit_robust DataModules); ``pad=0,
    flip=False`` trains on the images as they come.

    ``c`` is calibrated for the official gradient of the batch-*mean* loss at batch 128: the norm scales as
    1 / batch size, so here it is the per-example gradient divided by the global batch size (the per-rank
    batch times the number of ranks, i.e. what the official single-process ``DataParallel`` run averages over).
    At other batch sizes the same ``c`` gives other step sizes, as it would in the official code.

    State: ``N x C x (H + 2 pad) x (W + 2 pad)`` perturbations plus ``N`` averages on the accelerator (CIFAR-10:
    50,000 x 3 x 40 x 40 floats, 0.96 GB in fp32; ``state_dtype="float16"`` halves it, as the official
    ImageNet run does). They are saved in checkpoints (``lit_robust_atas_state``; a resumed run continues
    exactly) but are not module buffers, so DDP never broadcasts them; under DDP each step's updates are
    all-gathered so that every rank holds the same state (one all-gather of the batch's windows per step).

    Cost: 2 forward+backward passes per step (the gradient at ``x0`` + the update), as FGSM-RS; plus the
    per-example state in memory.

    Reported (paper, PreActResNet-18, CIFAR-10, 8/255): about 84 clean / 50 PGD-10 / 45 AutoAttack, and it
    keeps robustness at 12/255 and 16/255 where FGSM-RS overfits catastrophically [recalled, to be checked:
    the official README has no numbers].

    Deviations we chose: crop offsets and flips are drawn with torch on the accelerator (the official code uses
    Python's ``random``), with the same distribution; ``perturb(x, y)`` outside a training step (no index) is
    the step an unseen example gets: uniform start and the warm-up step ``eps``, the state untouched; the
    training images are zero-padded in the defense (the official dataset transform ``Pad(4)`` does the same).
    """

    needs_example_index = True  #: training batches must carry each example's index in the training set

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        c: float = 0.01,
        beta: float = 0.5,
        step_scale: float = 2 * 8 / 255,
        min_step_size: float = 4 / 255,
        max_step_size: float = 14 / 255,
        warmup_epochs: int = 5,
        step_size: Optional[float] = None,
        reset_every: int = 10,
        pad: int = 4,
        flip: bool = True,
        index: BatchKey = 2,
        num_examples: Optional[int] = None,
        state_dtype: Literal["float32", "float16", "bfloat16"] = "float32",
        lr_milestones: tuple[float, ...] = (24 / 30, 28 / 30),
        **kwargs: Any,
    ) -> None:
        linf_only(kwargs, "ATAS")
        if not (c > 0 and 0 <= beta < 1 and step_scale > 0 and 0 < min_step_size <= max_step_size):
            raise ValueError(f"need c > 0, 0 <= beta < 1, step_scale > 0 and 0 < min_step_size <= max_step_size, got "
                             f"c={c}, beta={beta}, step_scale={step_scale}, steps [{min_step_size}, {max_step_size}]")
        if warmup_epochs < 0 or pad < 0:
            raise ValueError(f"warmup_epochs and pad must be >= 0, got {warmup_epochs} and {pad}")
        if not all(0 < m <= 1 for m in lr_milestones):
            raise ValueError(f"lr_milestones are fractions of training in (0, 1], got {lr_milestones}")
        warmup_step_size = eps if step_size is None else step_size
        super().__init__(model, eps=eps, step_size=warmup_step_size, **kwargs)
        self.c, self.beta, self.step_scale = float(c), float(beta), float(step_scale)
        self.min_step_size, self.max_step_size = float(min_step_size), float(max_step_size)
        self.warmup_epochs, self.warmup_step_size = int(warmup_epochs), float(warmup_step_size)
        self.reset_every = positive_int(reset_every, "reset_every")
        self.pad, self.flip = int(pad), bool(flip)
        self.index_key = check_batch_key(index, "index")
        if state_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"state_dtype must be 'float32', 'float16' or 'bfloat16', got {state_dtype!r}")
        self.num_examples, self.state_dtype = num_examples, getattr(torch, state_dtype)
        self.lr_milestones = tuple(float(m) for m in lr_milestones)
        self.delta: Optional[Tensor] = None  #: per-example perturbations on the padded images [N, C, H+2p, W+2p]
        self.grad_norm_ema: Optional[Tensor] = None  #: per-example moving average of ||g||^2 [N]
        self._pending: Optional[tuple[Tensor, Tensor, Tensor, Tensor]] = None  # index, window, mirrored, start

    # --- per-example state -------------------------------------------------------------------

    def init_state(self, num_examples: int, image_shape: tuple[int, ...], device: torch.device) -> None:
        """Uniform ``U(-eps, eps)`` perturbations on the padded images and zero averages (official ``main``)."""
        ch, h, w = image_shape
        self.delta = torch.empty(num_examples, ch, h + 2 * self.pad, w + 2 * self.pad, device=device,
                                 dtype=self.state_dtype).uniform_(-self.eps, self.eps)
        self.grad_norm_ema = torch.zeros(num_examples, device=device)

    def _train_size(self) -> int:
        if self.num_examples is not None:
            return positive_int(self.num_examples, "num_examples")
        loader = self.trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        if dataset is None:
            raise ValueError("ATAS could not find the training set's size (the train dataloader has no dataset): "
                             "pass num_examples")
        return len(dataset)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        datamodule = getattr(self.trainer, "datamodule", None)
        if (self.pad or self.flip) and getattr(datamodule, "augment", False):
            raise ValueError("ATAS crops and flips the images itself (its per-example perturbation follows the "
                             "window): turn the DataModule's augmentation off "
                             f"({type(datamodule).__name__}(augment=False)), or pass pad=0, flip=False to ATAS")

    def on_train_epoch_start(self) -> None:
        """Redraws every perturbation before epochs ``reset_every``, ``2 reset_every``, ... (1-based, as the official
        ``epoch % epochs_reset == 0``), except before the last epoch."""
        epoch = self.current_epoch + 1
        if self.delta is not None and epoch % self.reset_every == 0 and epoch != self.trainer.max_epochs:
            self.delta.uniform_(-self.eps, self.eps)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.delta is not None:
            checkpoint[STATE_KEY] = {"delta": self.delta.cpu(), "grad_norm_ema": self.grad_norm_ema.cpu()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get(STATE_KEY)
        if state is not None:
            self.delta, self.grad_norm_ema = state["delta"], state["grad_norm_ema"]

    # --- the step ----------------------------------------------------------------------------

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = self.read_batch(batch, batch_idx)
        index = self.read_index(batch, x.shape[0])
        if self.delta is None:
            self.init_state(self._train_size(), tuple(x.shape[1:]), x.device)
        self.delta, self.grad_norm_ema = self.delta.to(x.device), self.grad_norm_ema.to(x.device)
        x, _, self._pending = self.augment(x, index)
        with inputs_checked():
            return self.adversarial_step(x, y, batch_idx)

    def read_index(self, batch: Any, batch_size: int) -> Tensor:
        """The examples' indices in the training set (``index``), or a ``ValueError`` saying how to provide them."""
        hint = ("ATAS keeps state per training example and needs each example's integer index in the training set "
                f"in the batch (index={self.index_key!r}): use a lit_robust DataModule with with_index=True, or a "
                "dataset returning (x, y, i)")
        try:
            index = batch_part(batch, self.index_key, "index")
        except ValueError as err:
            raise ValueError(f"{hint}; {err}") from None
        if index.shape != (batch_size,) or index.is_floating_point() or index.dtype == torch.bool:
            raise ValueError(f"{hint}; got {index.dtype} of shape {tuple(index.shape)} for {batch_size} images")
        return index.long()

    def augment(self, x: Tensor, index: Tensor, dy: Optional[Tensor] = None, dx: Optional[Tensor] = None,
                mirrored: Optional[Tensor] = None) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
        """The cropped and flipped batch, its start ``clamp(x + delta_i, 0, 1)`` in the same window, and what the
        write-back needs; offsets and flips are drawn unless given (tests give the official ones)."""
        b, p = x.shape[0], self.pad
        size = tuple(x.shape[2:])
        if dy is None:
            dy = torch.randint(0, 2 * p + 1, (b,), device=x.device)
            dx = torch.randint(0, 2 * p + 1, (b,), device=x.device)
        if mirrored is None:
            mirrored = (torch.rand(b, device=x.device) < 0.5) if self.flip else torch.zeros(b, dtype=torch.bool,
                                                                                            device=x.device)
        where = window_indices(dy, dx, size, size[1] + 2 * p)
        x = crop_flip(F.pad(x, (p, p, p, p)), where, mirrored, size)
        start = (x + crop_flip(self.delta[index], where, mirrored, size).to(x.dtype)).clamp(0, 1)
        return x, start, (index, where, mirrored, start)

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        """One FGSM step of the per-example adaptive size from the example's stored perturbation (in a training
        step), or of the warm-up size from a uniform start (called on its own)."""
        pending, self._pending = self._pending, None
        start = pending[3] if pending is not None else (x + AF.random_start(x, self.eps, "linf")).clamp(0, 1)
        with module_mode(self.model, self.attack_bn_mode), torch.enable_grad():
            _, _, grad = AF.loss_and_input_grad(self.model, start, torch.zeros_like(start), y,
                                                AF.per_example_loss("ce"))
        if pending is None:
            step = torch.full((x.shape[0],), self.warmup_step_size, device=x.device)
        else:
            step = self._adaptive_steps(grad, pending[0])
        x_adv = (start + step.view(-1, *[1] * (x.dim() - 1)) * grad.sign())
        x_adv = torch.min(torch.max(x_adv, x - self.eps), x + self.eps).clamp(0, 1).detach()
        if pending is not None:
            self._store(pending, x_adv - x)
        return x_adv

    def _adaptive_steps(self, grad: Tensor, index: Tensor) -> Tensor:
        """The warm-up step, or (after ``warmup_epochs``) the adaptive one from the updated average of the example's
        squared gradient norm (of the batch-mean loss: divided by the global batch size)."""
        if self.current_epoch < self.warmup_epochs:
            return torch.full((grad.shape[0],), self.warmup_step_size, device=grad.device)
        batch = grad.shape[0] * (self.trainer.world_size if self._trainer is not None else 1)
        sq_norm = (grad.flatten(1).float() / batch).norm(dim=1) ** 2
        ema = self.beta * self.grad_norm_ema[index] + (1 - self.beta) * sq_norm
        self.grad_norm_ema[index] = ema
        self._sync_rows(self.grad_norm_ema, index)
        return atas_step_sizes(ema, self.c, self.step_scale, self.min_step_size, self.max_step_size)

    def _store(self, pending: tuple[Tensor, Tensor, Tensor, Tensor], new_delta: Tensor) -> None:
        index, where, mirrored, _ = pending
        self.delta[index] = uncrop_into(self.delta[index], new_delta, where, mirrored)
        self._sync_rows(self.delta, index)

    def _sync_rows(self, state: Tensor, index: Tensor) -> None:
        """Under DDP, every rank's rows ``index`` of ``state`` written into every rank's copy (all-gather)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return
        rows = self.all_gather(state[index])
        state[self.all_gather(index).flatten()] = rows.flatten(0, 1)

    def outer_loss(self, x: Tensor, x_adv: Tensor, y: Tensor) -> TrainingOutput:
        return pgd_at_objective(self.model, x, x_adv, y, self.label_smoothing)

    def default_lr_scheduler(self, optimizer: torch.optim.Optimizer) -> tuple[Any, str]:
        """x0.1 at ``lr_milestones`` of the training steps (official: epochs 24 and 28 of 30), stepped every step."""
        total = finite_total(self.trainer.estimated_stepping_batches)
        milestones = [int(total * m) for m in self.lr_milestones]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, 0.1), "step"
