"""``AdversarialModule``: what every defense shares, so a defense file only holds its algorithm.

Owns: optimizer and scheduler wiring, clean / robust metrics (torchmetrics, synced across DDP
ranks; exact when the split divides evenly among ranks, since Lightning's DistributedSampler
otherwise repeats a few examples: take final numbers on one device),
robust validation and test with gradients enabled (also under ``trainer.validate`` /
``trainer.test``, which run in inference mode), the [0, 1] input check (first batch of every
epoch and stage: one host sync per epoch, none per step), a non-finite loss guard, and the
logged names ``train/loss``, ``train/adv_acc``, ``val/clean_acc``,
``val/robust_acc``, ``test/clean_acc``, ``test/robust_acc`` (+ ``test/autoattack_acc`` and
``test/worst_case_acc`` when AutoAttack runs at test time, ``train/fosc_mean`` and
``train/attack_steps`` when the training attack tracks FOSC), and exact resume (the
``ExactResume`` callback it brings along saves the random generators in checkpoints).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Literal, Optional, Union

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lit_robust.attacks import PGD, AttackResult
from lit_robust.attacks.functional import check_norm
from lit_robust.attacks.pgd import BN_MODES
from lit_robust.batches import check_batch_key, split_batch
from lit_robust.callbacks.exact_resume import ExactResume
from lit_robust.checkpoints import check_checkpoints_read_by
from lit_robust.checks import check_batch, check_eps, inputs_checked
from lit_robust.objectives import TrainingOutput
from lit_robust.objectives.awp import WeightPerturbation
from lit_robust.targets import class_labels, require_class_labels
from lit_robust.evaluation.tiers import attack_batch

_TEST_NAMES = {"clean": "clean_acc", "pgd": "robust_acc", "apgd-ce": "apgd_ce_acc", "apgd-t": "apgd_t_acc",
               "autoattack": "autoattack_acc", "worst_case": "worst_case_acc"}
_METRICS = ("train/adv_acc", "train/clean_acc", "val/clean_acc", "val/robust_acc", "test/clean_acc",
            "test/robust_acc", "test/autoattack_acc", "test/worst_case_acc", "train/fosc_mean",
            "train/attack_steps")
_PROGRESS_BAR = ("robust_acc", "certified_acc", "noisy_acc")
DEFENSE_KEY = "lit_robust_defense"  #: the checkpoint entry naming the defense class that wrote it


class AdversarialModule(L.LightningModule):
    """Base class of every defense.

    A defense implements the two halves of its algorithm box: ``perturb(x, y) -> x_adv``
    (the inner maximization; by default ``self.attack(self.model, x, y)``) and
    ``outer_loss(x, x_adv, y) -> TrainingOutput`` (what the weights minimise). Keeping them
    apart lets the base add adversarial weight perturbation (``awp_gamma``) to any defense.
    Defenses with several optimizer steps per batch (manual optimization) override
    ``adversarial_step`` (the training step on the batch's images and labels) instead and call
    ``watch_loss``.

    Args:
        model: maps [0, 1] images to logits (normalisation inside it).
        eps, norm: the threat model, in [0, 1] pixel units.
        steps, step_size: the training attack's iterations and step.
        optimizer: ``params -> Optimizer``; default ``default_optimizer`` (the paper's; in the
            base SGD(lr=0.1, momentum=0.9, weight_decay=5e-4)).
        lr_scheduler: ``optimizer -> LRScheduler`` stepped every ``lr_scheduler_interval``;
            default ``default_lr_scheduler`` (the paper's; in the base x0.1 at 50% and 75% of
            the training steps, Rice et al.'s 100/150 of 200 epochs, computed from
            ``trainer.estimated_stepping_batches``). The paper's schedule also applies to an
            ``optimizer`` given without ``lr_scheduler`` (so ``optimizer=`` changes the optimizer,
            not the recipe's decay); for a constant learning rate pass
            ``lr_scheduler=lambda opt: torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0)``
            (in a config: ``class_path: torch.optim.lr_scheduler.ConstantLR`` with ``factor: 1.0``).
            One INFO line at fit start says which schedule runs. A scheduler built with ``total_steps=None``
            that has ``set_total_steps`` (:mod:`lit_robust.optim.schedules`) is told the training length in
            its own units: optimizer steps (``lr_scheduler_interval="step"``) or ``max_epochs``.
        attack_bn_mode: module mode during the training attack, ``"eval"`` (running BN
            statistics, untouched), ``"train"`` (batch statistics, running ones updated, as Madry/Rice
            did) or ``"batch"`` (batch statistics, running ones untouched: the generated-data recipes).
        val_attack_steps, test_attack_steps: PGD iterations of the evaluation attacks (step
            ``2.5 * eps / steps``, random start, CE, eval mode).
        val_attack_loss, val_attack_step_size: the validation PGD's loss (``"margin"``: Carlini-Wagner, as the
            generated-data recipes select their checkpoint: DM-Improves-AT PGD-40 with step 2/255) and step
            (default ``2.5 * eps / val_attack_steps``).
        val_fp32: validation (clean and PGD accuracy, and the certified defenses' measures) with autocast off,
            i.e. in fp32 under ``precision="bf16-mixed"``, as ``test`` runs. False: in the Trainer's precision
            (faster on GPUs, but a bf16 PGD is a slightly different attack from the fp32 one that is reported).
        test_autoattack: also run the reference AutoAttack in ``test`` (slow; RobustBench's protocol).
        test_apgd: also run APGD-CE and APGD-T (the reference code's; ``test/apgd_ce_acc``,
            ``test/apgd_t_acc``). ``test`` runs the tiers of ``lit_robust.evaluation.tiers`` in fp32,
            eval mode, with frozen weights; ``test/robust_acc`` is PGD's and ``test/worst_case_acc``
            the per-example worst case over every attack run (when more than one ran).
        autoattack_version: ``"standard"`` for deterministic models, ``"rand"`` for randomised ones.
        label_smoothing: torch's convention (target ``1 - s + s/C`` on the true class, ``s/C``
            elsewhere) for the outer cross-entropy of defenses that use ``self.cross_entropy``.
        awp_gamma: adversarial weight perturbation (Wu et al. 2020, see ``objectives/awp.py``)
            of relative size gamma before the outer loss; 0 disables it. The paper uses 0.01
            with PGD-AT and 0.005 with TRADES. Needs automatic optimization.
        awp_warmup_epochs: epochs trained without AWP first (TRADES-AWP: 9, i.e. from the 10th).
        channels_last: keep the backbone's weights and its 4-D inputs channels-last (faster convolutions on
            tensor cores; the inputs are converted at the backbone's entry).
        compile_model: ``torch.compile`` the backbone in place before fitting/evaluating; ``True`` or a dict
            of ``torch.compile`` arguments (``{"mode": "max-autotune"}``). Input-gradient attacks run
            through the compiled model; mode switches and new batch shapes recompile once each.
        inputs, targets: where the images and the labels are in a batch: indices of a tuple or list batch
            (default ``(x, y, ...)``) or keys of a dict batch (``inputs="image", targets="label"``); see
            :mod:`lit_robust.batches`.

    Batches: the first batch of every epoch and stage is checked (float images in [0, 1], finite, integer
    labels in range, a model that returns logits, an L2 eps below the images' diameter) with one host sync;
    attacks inside the steps skip their own check (:func:`lit_robust.checks.inputs_checked`).

    bf16: pass ``precision="bf16-mixed"`` to the Trainer; training attacks and losses run under its autocast
    (losses and KL terms in fp32); validation (unless ``val_fp32=False``), ``test`` and certificates run in fp32.
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        norm: Literal["linf", "l2"] = "linf",
        steps: int = 10,
        step_size: float = 2 / 255,
        optimizer: Optional[OptimizerCallable] = None,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        attack_bn_mode: Literal["eval", "train", "batch"] = "eval",
        val_attack_steps: int = 10,
        val_attack_loss: Literal["ce", "margin"] = "ce",
        val_attack_step_size: Optional[float] = None,
        test_attack_steps: int = 20,
        val_fp32: bool = True,
        test_autoattack: bool = False,
        test_apgd: bool = False,
        autoattack_version: Literal["standard", "plus", "rand"] = "standard",
        label_smoothing: float = 0.0,
        awp_gamma: float = 0.0,
        awp_warmup_epochs: int = 0,
        channels_last: bool = False,
        compile_model: Union[bool, dict[str, Any]] = False,
        inputs: Union[int, str] = 0,
        targets: Union[int, str] = 1,
    ) -> None:
        super().__init__()
        if attack_bn_mode not in BN_MODES:
            raise ValueError(f"attack_bn_mode must be one of {BN_MODES}, got {attack_bn_mode!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if awp_gamma < 0 or awp_warmup_epochs < 0:
            raise ValueError(f"awp_gamma and awp_warmup_epochs must be >= 0, got {awp_gamma}, {awp_warmup_epochs}")
        if not isinstance(compile_model, (bool, dict)):
            raise ValueError(f"compile_model must be a bool or a dict of torch.compile arguments, got {compile_model!r}")
        if lr_scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"lr_scheduler_interval must be 'epoch' or 'step', got {lr_scheduler_interval!r}")
        check_norm(norm)
        check_eps(eps, norm)
        self.batch_keys = (check_batch_key(inputs, "inputs"), check_batch_key(targets, "targets"))
        self.save_hyperparameters(ignore=["model", "optimizer", "lr_scheduler"])
        self.model = model
        self.eps, self.norm = float(eps), check_norm(norm)
        self.steps, self.step_size = steps, step_size
        self.attack_bn_mode = attack_bn_mode
        self.val_fp32 = val_fp32
        self.test_autoattack, self.test_apgd, self.autoattack_version = test_autoattack, test_apgd, autoattack_version
        self.label_smoothing = label_smoothing
        self.awp = WeightPerturbation(awp_gamma) if awp_gamma > 0 else None
        self.awp_warmup_epochs = awp_warmup_epochs
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.channels_last, self.compile_model = channels_last, compile_model
        self._channels_last_hook = self._compiled = False
        # PGD validates eps, steps and step sizes with messages naming each argument.
        PGD(eps, steps, step_size, norm)
        if val_attack_loss not in ("ce", "margin"):
            raise ValueError(f"val_attack_loss must be 'ce' or 'margin', got {val_attack_loss!r}")
        self.val_attack = PGD(eps, positive_int(val_attack_steps, "val_attack_steps"), val_attack_step_size, norm=norm,
                              loss=val_attack_loss)
        self.test_attack = PGD(eps, positive_int(test_attack_steps, "test_attack_steps"), norm=norm)
        self.metrics = nn.ModuleDict({name.replace("/", "_"): _mean_metric() for name in _METRICS})
        self._first_nonfinite_step: Optional[Tensor] = None
        self.last_attack_result: Optional[AttackResult] = None  #: the training attack's, when it tracks FOSC
        self._train_means: dict[str, str] = {}  # training metrics updated this epoch: logged name -> metric key

    #: why a defense needs class-index training targets (refusing probability rows), or "" when it takes both
    class_labels_only: str = ""

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    # --- the fast path ---------------------------------------------------------------------

    def configure_model(self) -> None:
        """``channels_last`` weights and inputs, and with ``compile_model`` ``torch.compile`` of the backbone in
        place (``nn.Module.compile``: parameter names and checkpoints are unchanged; attacks call the compiled
        model). Runs before fit, validate and test; each change is made once."""
        if self.channels_last and not self._channels_last_hook:
            self.model.to(memory_format=torch.channels_last)
            # at the backbone's entry, so attacks, manual-optimization steps and evaluation all get it
            self.model.register_forward_pre_hook(_channels_last_input)
            self._channels_last_hook = True
        if self.compile_model and not self._compiled:
            self.model.compile(**({} if self.compile_model is True else self.compile_model))
            self._compiled = True

    # --- what a defense implements -------------------------------------------------------

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        """The inner maximization: an adversarial batch for the current weights.

        When the attack tracks FOSC (``FOSCSchedule``), its full result is kept in
        ``last_attack_result`` for logging and callbacks.
        """
        if not getattr(self.attack, "track_fosc", False):
            return self.attack(self.model, x, y)
        self.last_attack_result = self.attack.run(self.model, x, y)
        return self.last_attack_result.x_adv

    def in_threat_model(self, x: Tensor, x_adv: Tensor) -> Tensor:
        """Per example: ``x_adv`` in the [0, 1] box and within ``eps`` of ``x`` in the defense's norm (a defense with
        another threat model, such as a union of balls, overrides it)."""
        d = (x_adv - x).detach().flatten(1)
        size = d.abs().amax(1) if self.norm == "linf" else d.norm(dim=1)
        return (size <= self.eps + 1e-6) & (x_adv.flatten(1).amin(1) >= 0) & (x_adv.flatten(1).amax(1) <= 1)

    def scheduled_attack(self) -> PGD:
        """The training attack that schedules (``lit_robust.callbacks``) adjust: ``self.attack``.

        A defense whose inner maximization is not a :class:`~lit_robust.attacks.PGD` held in
        ``self.attack`` (Free AT's replays, FGSM-SDI's generator) has none and raises.
        """
        attack = getattr(self, "attack", None)
        if not isinstance(attack, PGD):
            raise TypeError(f"{type(self).__name__} has no PGD training attack (self.attack) for a schedule to set")
        return attack

    def outer_loss(self, x: Tensor, x_adv: Tensor, y: Tensor) -> TrainingOutput:
        """The loss the weights minimise, given the clean and the adversarial batch."""
        raise NotImplementedError

    def cross_entropy(self, logits: Tensor, y: Tensor) -> Tensor:
        """Mean cross-entropy with this defense's ``label_smoothing``."""
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)

    def training_loss(self, x: Tensor, y: Tensor) -> TrainingOutput:
        """One batch of the min-max problem: inner maximization, [AWP,] then the outer loss."""
        x_adv = self.perturb(x, y)
        if self.awp is not None and self.current_epoch >= self.awp_warmup_epochs:
            self.awp.apply(self.model, lambda: self.outer_loss(x, x_adv, y).loss)
        return self.outer_loss(x, x_adv, y)

    def on_after_backward(self) -> None:
        if self.awp is not None:
            self.awp.restore()  # the optimizer steps from w with the gradient taken at w + v

    def setup(self, stage: str) -> None:
        """The Trainer checks a local ``ckpt_path`` before reading it: a missing, empty or truncated file is named."""
        check_checkpoints_read_by(self.trainer)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[DEFENSE_KEY] = type(self).__name__

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuses to resume ``fit`` from another defense's checkpoint (its optimizer and scheduler state would
        carry on silently); evaluating another defense's weights only warns."""
        saved = checkpoint.get(DEFENSE_KEY)
        if saved is None or saved in {cls.__name__ for cls in type(self).__mro__}:  # the same defense or a parent
            return
        message = f"the checkpoint was written by {saved}, and this module is {type(self).__name__}"
        if self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            raise ValueError(f"{message}: resuming fit would continue {saved}'s optimizer, scheduler and loop state. "
                             f"To start {type(self).__name__} from those weights, load them into the model (e.g. "
                             "lit_robust.evaluation.export.classifier_state_dict) and fit without ckpt_path")
        rank_zero_warn(f"{message}; its weights are evaluated as they are")

    def on_fit_start(self) -> None:
        if self.awp is not None and not self.automatic_optimization:
            raise ValueError(f"awp_gamma needs automatic optimization; {type(self).__name__} uses manual optimization")

    # --- training --------------------------------------------------------------------------

    def read_batch(self, batch: Any, batch_idx: int) -> tuple[Tensor, Tensor]:
        """The images and labels of ``batch`` (``inputs`` / ``targets``); the first batch of an epoch or stage is
        checked (:func:`lit_robust.checks.check_batch`, one host sync).

        Training targets may be probability rows (:mod:`lit_robust.targets`) unless the defense's
        ``class_labels_only`` names why it needs one class per example; evaluation always needs class labels.
        """
        x, y = split_batch(batch, *self.batch_keys)
        if not self.training:
            require_class_labels(y, f"{type(self).__name__}'s evaluation (accuracy against one class)")
        elif self.class_labels_only:
            require_class_labels(y, f"{type(self).__name__} ({self.class_labels_only})")
        if batch_idx == 0:
            check_eps(self.eps, self.norm, x)
            check_batch(self.model, x, y)
        return x, y

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = self.read_batch(batch, batch_idx)
        with inputs_checked():
            return self.adversarial_step(x, y, batch_idx)

    def adversarial_step(self, x: Tensor, y: Tensor, batch_idx: int) -> Tensor:
        """One training step on images ``x`` and labels ``y``; manual-optimization defenses override it."""
        out = self.training_loss(x, y)
        self.log_loss(out.loss, x.shape[0])
        if out.adv_logits is not None:
            self._log_accuracy("train/adv_acc", out.adv_logits, y)
        if out.clean_logits is not None:
            self._log_accuracy("train/clean_acc", out.clean_logits, y)
        if self.last_attack_result is not None and self.last_attack_result.fosc is not None:
            self._log_mean("train/fosc_mean", self.last_attack_result.fosc)
            self._log_mean("train/attack_steps", self.last_attack_result.steps.float())
        self.watch_loss(out.loss)
        return out.loss

    def log_loss(self, loss: Tensor, batch_size: int) -> None:
        """Logs ``train/loss`` per step. Not on the progress bar: the bar reads its metrics at every refresh,
        a host sync per step (TensorBoard gets the value every ``log_every_n_steps``)."""
        self.log("train/loss", loss.detach(), batch_size=batch_size)

    def watch_loss(self, loss: Tensor) -> None:
        """Remembers, on the device, the first step whose loss was not finite (no host sync)."""
        step = torch.full((), self.global_step, device=loss.device)
        bad = ~torch.isfinite(loss.detach())
        first = self._first_nonfinite_step
        first = torch.full((), -1, device=loss.device) if first is None else first
        self._first_nonfinite_step = torch.where(bad & (first < 0), step, first)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Checked where Lightning syncs for logging anyway, and at the end of each epoch.
        last = batch_idx + 1 == self.trainer.num_training_batches
        if self._first_nonfinite_step is not None and (last or self.global_step % self.trainer.log_every_n_steps == 0):
            step = int(self._first_nonfinite_step)
            if step >= 0:
                raise FloatingPointError(f"training loss became non-finite at global step {step}; stopping")

    # --- evaluation ------------------------------------------------------------------------

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        fp32 = torch.autocast(self.device.type, enabled=False) if self.val_fp32 else nullcontext()
        with fp32:
            x, y = self.read_batch(batch, batch_idx)
            with inputs_checked():
                self._evaluate(x, y, batch_idx, "val", dataloader_idx)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = self.read_batch(batch, batch_idx)
        with inputs_checked():
            self._evaluate(x, y, batch_idx, "test", dataloader_idx)

    def test_tiers(self) -> tuple[str, ...]:
        """The evaluation tiers ``test`` runs: PGD, plus APGD and AutoAttack when asked for."""
        return ("pgd",) + ("apgd",) * self.test_apgd + ("autoattack",) * self.test_autoattack

    def _evaluate(self, x: Tensor, y: Tensor, batch_idx: int, stage: str, dataloader_idx: int = 0) -> None:
        # validate/test run under inference mode by default; attacks need gradients, and
        # cross_entropy saves its target for backward, so both x and y are cloned out of it.
        # Metrics are updated outside that block: their states may be inference tensors.
        with torch.inference_mode(False), torch.enable_grad():
            x, y = x.clone(), y.clone()
            if stage == "test":  # the evaluation tiers: fp32, eval mode, frozen weights, per-example worst case
                tiers = self.test_tiers()
                found = attack_batch(self.model, x, y, self.eps, self.norm, tiers, self.test_attack.steps,
                                     self.test_attack.restarts, autoattack_version=self.autoattack_version)
                correct = {f"test/{_TEST_NAMES[k]}": v for k, v in found.items() if k != "worst_case" or len(tiers) > 1}
            else:
                with torch.no_grad():
                    correct = {"val/clean_acc": self.model(x).argmax(1) == y}
                correct["val/robust_acc"] = self.val_attack.run(self.model, x, y).predictions == y
        for name, value in correct.items():
            self._log_correct(name, value, dataloader_idx)

    def _log_accuracy(self, name: str, logits: Tensor, y: Tensor) -> None:
        """Accuracy against the labels, or against each probability row's most likely class."""
        self._log_correct(name, logits.detach().argmax(1) == class_labels(y))

    def _log_correct(self, name: str, correct: Tensor, dataloader_idx: int = 0) -> None:
        self._log_mean(name, correct.float(), dataloader_idx)

    def _log_mean(self, name: str, values: Tensor, dataloader_idx: int = 0) -> None:
        """Logs the epoch mean of per-example ``values`` (a torchmetrics MeanMetric: exact under DDP).

        Each evaluation dataloader gets its own metric (Lightning then suffixes the logged
        name with ``/dataloader_idx_N``).
        """
        key = name.replace("/", "_").replace(".", "_") + (f"_dataloader{dataloader_idx}" if dataloader_idx else "")
        if key not in self.metrics:
            self.metrics[key] = _mean_metric().to(self.device)
        metric = self.metrics[key]
        metric.update(values)
        if name.startswith("train/"):  # logged once, at the epoch's end: each self.log call costs ~1 ms of host time
            self._train_means[name] = key
            return
        self._log_metric(name, key, values.shape[0])

    def on_train_epoch_end(self) -> None:
        """Logs the epoch means of the training metrics accumulated by ``_log_mean``."""
        for name, key in self._train_means.items():
            self._log_metric(name, key)
        self._train_means = {}

    def _log_metric(self, name: str, key: str, batch_size: Optional[int] = None) -> None:
        metric = self.metrics[key]
        # metric_attribute: Lightning indexes the module's metrics once, before later ones exist.
        self.log(name, metric, on_step=False, on_epoch=True, prog_bar=name.endswith(_PROGRESS_BAR),
                 batch_size=batch_size, metric_attribute=f"metrics.{key}")

    def defense_callbacks(self) -> list[L.Callback]:
        """Callbacks every defense needs: :class:`~lit_robust.callbacks.ExactResume`; defenses add theirs."""
        return [ExactResume()]

    def configure_callbacks(self) -> list[L.Callback]:
        """``defense_callbacks()``, less those the Trainer already holds: one this module added on an earlier
        ``fit``/``test`` call of the same Trainer (replacing it would log "will override existing callbacks"
        and drop its state), or an ``ExactResume`` the user gave."""
        present = list(self._trainer.callbacks) if self._trainer is not None else []
        ours = {type(c) for c in present if getattr(c, "_added_by_defense", None) == id(self)}
        resume_given = any(isinstance(c, ExactResume) for c in present)
        callbacks = [c for c in self.defense_callbacks()
                     if type(c) not in ours and not (resume_given and isinstance(c, ExactResume))]
        for callback in callbacks:
            callback._added_by_defense = id(self)
        return callbacks

    # --- optimisation ----------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        params = self.model.parameters()
        optimizer = self.default_optimizer(params) if self.optimizer_factory is None else self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            scheduler, interval = self.default_lr_scheduler(optimizer)
            schedule = (f"the paper's: {self._default_schedule_doc()} (an optimizer given without lr_scheduler "
                        "keeps it; pass lr_scheduler to replace it)")
        else:
            scheduler, interval = self.lr_scheduler_factory(optimizer), self.lr_scheduler_interval
            if getattr(scheduler, "total_steps", 0) is None and hasattr(scheduler, "set_total_steps"):
                scheduler.set_total_steps(self._schedule_length(interval))
            schedule = f"the given {type(scheduler).__name__}, stepped every {interval}"
        rank_zero_info(f"{type(self).__name__}: {type(optimizer).__name__}, learning-rate schedule {schedule}")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    def _schedule_length(self, interval: str) -> int:
        """The training length in scheduler steps: optimizer steps (``interval="step"``) or epochs."""
        if interval == "step":
            return finite_total(self.trainer.estimated_stepping_batches)
        if self.trainer.max_epochs is None or self.trainer.max_epochs < 0:
            raise ValueError("an epoch-wise schedule that needs the training length needs max_epochs")
        return int(self.trainer.max_epochs)

    def _default_schedule_doc(self) -> str:
        doc = (type(self).default_lr_scheduler.__doc__ or "").strip().splitlines()
        return doc[0].rstrip(".") if doc else type(self).default_lr_scheduler.__qualname__

    def default_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """The paper's optimizer when none is given; here SGD(lr=0.1, momentum=0.9, weight_decay=5e-4)."""
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)

    def default_lr_scheduler(self, optimizer: torch.optim.Optimizer) -> tuple[Any, str]:
        """x0.1 at 50% and 75% of the training steps (Rice et al.: epochs 100 and 150 of 200), stepped every step."""
        total = finite_total(self.trainer.estimated_stepping_batches)
        milestones = [int(total * 0.5), int(total * 0.75)]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, 0.1), "step"


def _channels_last_input(module: nn.Module, args: tuple) -> tuple:
    x, *rest = args
    return (x.contiguous(memory_format=torch.channels_last), *rest) if x.dim() == 4 else args


def _mean_metric() -> MeanMetric:
    """A MeanMetric without the NaN check, whose ``if nans.any()`` would sync with the host at every update
    (the values are 0/1 correctness flags and attack statistics; a non-finite loss has its own guard)."""
    return MeanMetric(nan_strategy="disable")


def positive_int(value: int, name: str) -> int:
    """``value`` as an int, or a ``ValueError`` naming the argument unless it is an integer >= 1."""
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value}")
    return int(value)


def linf_only(kwargs: dict[str, Any], method: str) -> None:
    """A ``ValueError`` unless the defense arguments ``kwargs`` leave ``norm`` at ``"linf"`` (sign-step methods)."""
    if kwargs.get("norm", "linf") != "linf":
        raise ValueError(f"norm must be 'linf' for {method} (a sign-step method), got {kwargs['norm']!r}")


def finite_total(steps: float) -> int:
    """``trainer.estimated_stepping_batches`` for a schedule that needs the training length."""
    if steps == float("inf"):
        raise ValueError("this schedule needs a finite training length: set max_epochs or max_steps")
    return int(steps)
