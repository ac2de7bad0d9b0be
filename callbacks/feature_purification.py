"""Feature purification probe: what adversarial training does to each neuron of a clean-trained network.

Allen-Zhu & Li, "Feature Purification: How Adversarial Training Performs Robust Deep Learning", FOCS 2021
(arXiv:2005.10190); there is no official code. Their principle: let ``w0_i`` be neuron ``i``'s weights at
initialization, ``w_i`` after clean training and ``w'_i`` after adversarial training started from ``w_i``. For
most neurons ``w_i = beta_i w'_i + v_i`` with ``||beta_i w'_i|| > ||v_i||``: clean training already found most of
the robust feature, and the remainder ``v_i``, a small "dense mixture", is what adversarial training removes
("purifies"); both ``w_i`` and ``w'_i`` are nearly uncorrelated with ``w0_i``. Their experiments start adversarial
training from a clean CIFAR-10 model, compare per-layer correlations between clean, adversarial and initial
weights, show first-layer filters (noisy when clean, purified when adversarial) and, in v4, find that the
adversarial update ``W' - W`` is of low rank. This callback measures exactly those quantities during a run.

Here ``w`` is the live weight (``w'`` above, while adversarial training runs), ``w_ref`` the reference (the
clean model ``w``) and ``w_init`` the initialization. Neurons are output units: the rows of every ``Conv1d/2d/3d``
and ``Linear`` weight of the backbone (``pl_module.model``; the whole module when it has none), reshaped to
``[out, fan_in]``; biases are left out. Logged under ``purification/<layer>/`` (``<layer>`` the module's name in
the backbone, e.g. ``features.0``) and, over the whole network, ``purification/all/``:

===================  ======================================================================================
``cos_init``         mean over neurons of ``cos(w_i, w_init_i)``. Near 0: the neuron moved far from its
                     random start (the paper's claim for trained networks); near 1: it barely moved.
``cos_ref``          mean of ``cos(w_i, w_ref_i)``: how much of the reference direction is kept.
``feature_share``    share of neurons whose reference is mostly the current feature: in
                     ``w_ref_i = beta_i w_i + v_i`` (``beta_i = <w_ref_i, w_i> / ||w_i||^2``, ``v_i`` orthogonal
                     to ``w_i``), ``||beta_i w_i|| > ||v_i||``. The paper's "most neurons" claim: close to 1.
``residual_ratio``   median of ``||v_i|| / ||beta_i w_i||``, the size of the removed "dense mixture" relative to
                     the kept feature; below 1 where ``feature_share`` is above one half.
``stable_rank``      of the update ``dW = W - W_ref``: ``||dW||_F^2 / ||dW||_2^2``, between 1 (one direction)
                     and ``min(out, fan_in)``. Small: a low-rank update (the paper's v4 observation).
``energy_top<r>``    share of ``||dW||_F^2`` in the ``r`` largest singular values (for each ``r`` in ``top_r``).
``update_norm``      ``||dW||_F / ||W_ref||_F``: how far the layer moved from the reference, relatively.
===================  ======================================================================================

Both decomposition statistics are functions of the angle ``theta_i`` between ``w_ref_i`` and ``w_i``:
``||beta_i w_i|| = ||w_ref_i|| |cos theta_i|`` and ``||v_i|| = ||w_ref_i|| sin theta_i``, so a neuron counts in
``feature_share`` exactly when ``|cos theta_i| > 1/sqrt(2)``, and ``residual_ratio`` is the median ``|tan theta_i|``.
``purification/all/`` pools the neurons of all layers for the first four (each neuron counts once, so wide layers
weigh more), averages ``stable_rank`` and ``energy_top<r>`` over layers, and ``update_norm`` is the whole network's
``sqrt(sum ||dW||_F^2 / sum ||W_ref||_F^2)``.

Zero rows: a neuron with a zero weight row has no direction; its cosines count as 0 (torch's convention). A zero
live row gives ``beta = 0`` and ``v = w_ref``: it does not count in ``feature_share`` and its ratio is ``inf``. A zero
reference row has nothing to decompose: it is left out of ``feature_share`` and ``residual_ratio`` (NaN when every
row is). A zero update (``W = W_ref``, e.g. before the first step when the reference is the start of fit) makes
``stable_rank`` and ``energy_top<r>`` NaN: undefined, not small.

The picture: ``purification/filters``, the first layer's filters (per-filter min-max normalised, enlarged, one
cell per output unit): a first ``Conv2d`` over 1 or 3 channels as they are, a first ``Linear`` reshaped to the
input image (``image_shape``, else the DataModule's ``dims``) when the sizes match; otherwise none, said once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torchvision.utils import make_grid

from lit_robust.callbacks.example_logger import PAD, upsampled
from lit_robust.callbacks.weights_from_checkpoint import backbone, checkpoint_weights, read_checkpoint

TAG = "purification"
FILTERS_TAG = f"{TAG}/filters"
LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
FIT_START = "fit_start"
FILTER_SIDE = 24  # pixels a filter cell gets at least (a 3x3 kernel is enlarged 8 times)

Weights = dict[str, Tensor]


# --- the statistics, as plain functions of weight matrices ---------------------------------------------------------

def _rows(weight: Tensor) -> Tensor:
    return weight.detach().reshape(weight.shape[0], -1).to("cpu", torch.float64)


def row_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Per-row cosine of two ``[out, ...]`` weights; 0 for a row where either is zero."""
    a, b = _rows(a), _rows(b)
    norms = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(norms > 0, (a * b).sum(1) / torch.where(norms > 0, norms, 1.0), 0.0)


def decompose(reference: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """``beta, v`` with ``reference_i = beta_i * weight_i + v_i`` and ``v_i`` orthogonal to ``weight_i``, per row.

    ``beta_i = <reference_i, weight_i> / ||weight_i||^2``; a zero ``weight_i`` gives ``beta_i = 0``, ``v_i =
    reference_i``. Returns ``beta`` ``[out]`` and ``v`` ``[out, fan_in]`` in float64 on the CPU.
    """
    r, w = _rows(reference), _rows(weight)
    squared = (w * w).sum(1)
    beta = torch.where(squared > 0, (r * w).sum(1) / torch.where(squared > 0, squared, 1.0), 0.0)
    return beta, r - beta[:, None] * w


def neuron_statistics(weight: Tensor, init: Tensor, reference: Tensor) -> dict[str, Tensor]:
    """Per-neuron (per-row) values of one layer: ``cos_init``, ``cos_ref``, ``feature`` (``||beta w||``),
    ``residual`` (``||v||``), ``ratio`` (``||v|| / ||beta w||``: ``inf`` when only the feature is zero, NaN when
    the reference row is zero) and ``valid`` (the reference row is not zero)."""
    beta, v = decompose(reference, weight)
    feature, residual = beta.abs() * _rows(weight).norm(dim=1), v.norm(dim=1)
    valid = _rows(reference).norm(dim=1) > 0
    ratio = torch.where(feature > 0, residual / torch.where(feature > 0, feature, 1.0), math.inf)
    return {"cos_init": row_cosine(weight, init), "cos_ref": row_cosine(weight, reference), "feature": feature,
            "residual": residual, "ratio": torch.where(valid, ratio, math.nan), "valid": valid}


def median(values: Tensor) -> float:
    """The median of the non-NaN values (the mean of the two middle ones for an even count; ``inf`` allowed);
    NaN when there are none."""
    values = values[~values.isnan()].sort().values
    n = len(values)
    return float((values[(n - 1) // 2] + values[n // 2]) / 2) if n else math.nan


def squared_singular_values(matrix: Tensor) -> Tensor:
    """The squared singular values of a 2-D ``matrix``, largest first: the eigenvalues of its smaller Gram matrix
    (float64 on the CPU: one ``min(m, n)``-sided ``eigvalsh``, cheaper than an SVD of a wide convolution)."""
    m = matrix.to("cpu", torch.float64)
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return torch.linalg.eigvalsh(gram).clamp_min(0).flip(0)


def update_statistics(weight: Tensor, reference: Tensor, top_r: Sequence[int] = (1, 5)) -> dict[str, float]:
    """``stable_rank``, ``energy_top<r>`` and ``update_norm`` of ``dW = weight - reference`` (both reshaped to
    ``[out, fan_in]``); the first two are NaN for a zero update."""
    update = _rows(weight) - _rows(reference)
    energy = squared_singular_values(update)
    total = float(energy.sum())
    reference_norm = float(_rows(reference).norm())
    stats = {"stable_rank": total / float(energy[0]) if total > 0 else math.nan}
    for r in top_r:
        stats[f"energy_top{r}"] = float(energy[:r].sum()) / total if total > 0 else math.nan
    stats["update_norm"] = math.sqrt(total) / reference_norm if reference_norm > 0 else math.nan
    return stats


def purification_metrics(weights: Weights, init: Weights, reference: Weights,
                         top_r: Sequence[int] = (1, 5), per_layer: bool = True) -> dict[str, float]:
    """Every logged value (module docstring) for layers ``name -> weight``, keyed ``purification/<name>/<stat>``
    and ``purification/all/<stat>``; ``init`` and ``reference`` hold the same names and shapes."""
    metrics: dict[str, float] = {}
    pooled: dict[str, list[Tensor]] = {"cos_init": [], "cos_ref": [], "dominant": [], "valid": [], "ratio": []}
    layer_stats: list[dict[str, float]] = []
    update_sq = reference_sq = 0.0
    for name, weight in weights.items():
        neurons = neuron_statistics(weight, init[name], reference[name])
        valid = neurons["valid"]
        dominant = (neurons["feature"] > neurons["residual"]) & valid
        stats = {"cos_init": float(neurons["cos_init"].mean()), "cos_ref": float(neurons["cos_ref"].mean()),
                 "feature_share": float(dominant.sum() / valid.sum()) if valid.any() else math.nan,
                 "residual_ratio": median(neurons["ratio"]), **update_statistics(weight, reference[name], top_r)}
        layer_stats.append(stats)
        if per_layer:
            metrics.update({f"{TAG}/{name or 'model'}/{k}": v for k, v in stats.items()})
        for key in pooled:
            pooled[key].append(dominant if key == "dominant" else neurons[key])
        update_sq += float((_rows(weight) - _rows(reference[name])).square().sum())
        reference_sq += float(_rows(reference[name]).square().sum())
    if not layer_stats:
        return metrics
    cat = {k: torch.cat(v) for k, v in pooled.items()}
    valid_count = int(cat["valid"].sum())
    summary = {"cos_init": float(cat["cos_init"].mean()), "cos_ref": float(cat["cos_ref"].mean()),
               "feature_share": int(cat["dominant"].sum()) / valid_count if valid_count else math.nan,
               "residual_ratio": median(cat["ratio"])}
    for key in ("stable_rank", *(f"energy_top{r}" for r in top_r)):
        summary[key] = _nanmean([s[key] for s in layer_stats])
    summary["update_norm"] = math.sqrt(update_sq / reference_sq) if reference_sq > 0 else math.nan
    metrics.update({f"{TAG}/all/{k}": v for k, v in summary.items()})
    return metrics


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def filter_grid(weight: Tensor, image_shape: Optional[Sequence[int]] = None, min_side: int = FILTER_SIDE
                ) -> Optional[Tensor]:
    """A first layer's filters as one ``[3, H, W]`` picture in [0, 1], or None when they are not images.

    A ``Conv2d`` weight ``[out, C, kh, kw]`` with ``C`` 1 (grey) or 3 (RGB) is used as it is; a ``Linear`` weight
    ``[out, fan_in]`` is reshaped to ``image_shape`` (``(H, W)`` or ``(C, H, W)``) when ``fan_in`` matches it.
    Each filter is min-max normalised on its own (a constant filter is mid-grey), enlarged to at least
    ``min_side`` pixels a side by pixel repetition, and the filters are laid out in a near-square grid.
    """
    w = weight.detach().to("cpu", torch.float32)
    if w.dim() == 2:
        shape = tuple(int(s) for s in image_shape or ())
        shape = (1, *shape) if len(shape) == 2 else shape
        if len(shape) != 3 or math.prod(shape) != w.shape[1] or shape[0] not in (1, 3):
            return None
        w = w.reshape(w.shape[0], *shape)
    elif w.dim() != 4 or w.shape[1] not in (1, 3):
        return None
    flat = w.flatten(1)
    low, span = flat.min(1).values[:, None], (flat.max(1).values - flat.min(1).values)[:, None]
    images = torch.where(span > 0, (flat - low) / torch.where(span > 0, span, 1.0), 0.5).view_as(w)
    return make_grid(upsampled(images, min_side), nrow=math.ceil(math.sqrt(len(images))), padding=PAD)


# --- the callback -------------------------------------------------------------------------------------------------

def probed_layers(module: nn.Module) -> dict[str, nn.Module]:
    """The backbone's ``Conv1d/2d/3d`` and ``Linear`` layers by name, in registration order (for a network built
    in forward order, the first one is the first layer)."""
    return {name: m for name, m in module.named_modules() if isinstance(m, LAYER_TYPES)}


def _weight_key(layer: str) -> str:
    return f"{layer}.weight" if layer else "weight"


class FeaturePurificationProbe(Callback):
    """Logs, per epoch, how every layer's neurons relate to their initialization and to a reference model.

    The measured quantities, their logged names and how to read them are in the module docstring
    (:mod:`lit_robust.callbacks.feature_purification`). The clean-then-adversarial experiment:
    ``configs/feature_purification_digits_clean.yaml`` trains clean with this probe (its checkpoint keeps the
    initialization), then ``configs/feature_purification_digits.yaml`` trains PGD-AT from that checkpoint's
    weights (:class:`~lit_robust.callbacks.WeightsFromCheckpoint`) with ``reference`` that checkpoint;
    ``scripts/feature_purification_digits.py`` runs both and plots the curves.

    When: as training starts in a new fit (global step 0, logged at step 0; a resumed fit skips it) and at the
    end of every ``every_n_epochs``-th training epoch (epochs ``n - 1``, ``2n - 1``, ...), at the global step,
    with the live weights (a ``WeightAveraging`` / ``EMA`` average is only swapped in for validation). Scalars
    go to every logger of the Trainer (``log_metrics``: TensorBoard, CSV, ...), the filter picture to a
    ``TensorBoardLogger``; ``history`` keeps every logged set in memory (``{"epoch": completed epochs, "step":
    global step, name: value}``) and ``metrics(pl_module)`` computes them on demand.

    Args:
        reference: ``"fit_start"``: the weights when training starts, before the first step (after every
            ``on_fit_start``, so after a ``WeightsFromCheckpoint`` load: the clean model in the experiment); or
            the path of a checkpoint (a lit_robust / Lightning one, its ``model.*`` weights, or a plain state
            dict) whose weights are the reference.
        init: the initialization ``w_init``. ``"auto"`` (default): the one a probe saved in the ``reference``
            checkpoint, when ``reference`` is a checkpoint written with this probe (the clean stage's random
            initialization), else the weights when training starts (with a warning when ``reference`` is a
            checkpoint without it). ``"fit_start"``: the weights when training starts. A path: the
            initialization a probe saved in that checkpoint, else that checkpoint's weights (e.g. one saved
            before training).
        every_n_epochs: measure every n-th training epoch (>= 1).
        top_r: the ``r`` of the ``energy_top<r>`` statistics (each >= 1).
        per_layer: log every layer's statistics; False logs only ``purification/all/``.
        filters: log the first layer's filter picture (``purification/filters``).
        image_shape: ``(H, W)`` or ``(C, H, W)`` of the inputs, to picture a first ``Linear`` layer; default the
            DataModule's ``dims`` when it has them.

    Only global rank 0 keeps the copies, computes and logs; no other rank does anything and no collective is
    called, so DDP ranks never wait on each other because of it. Nothing runs inside the training step or per
    batch: no host synchronisation is added to a step. The initialization and the reference are the callback's
    state (``state_dict``: CPU tensors by layer name, loadable with ``torch.load(weights_only=True)``), so a run
    resumed with ``ckpt_path`` compares against the same weights; added to a resumed run whose checkpoint has no
    such state, it starts from the resumed weights.

    Cost: per measurement, for each layer, two row-cosine passes, one decomposition and one ``eigvalsh`` of the
    smaller Gram matrix of ``dW`` (``O(min(out, fan_in)^2 * max(out, fan_in))``), in float64 on the CPU, plus
    one CPU copy of the live weights; memory: two CPU copies of the conv/linear weights (one when the reference
    is the initialization), kept in every checkpoint too.
    """

    def __init__(
        self,
        reference: str = FIT_START,
        init: str = "auto",
        every_n_epochs: int = 1,
        top_r: Sequence[int] = (1, 5),
        per_layer: bool = True,
        filters: bool = True,
        image_shape: Optional[Sequence[int]] = None,
    ) -> None:
        for name, value in (("reference", reference), ("init", init)):
            if not isinstance(value, (str, Path)) or not str(value):
                choices = "'auto', 'fit_start'" if name == "init" else "'fit_start'"
                raise ValueError(f"{name} must be {choices} or a checkpoint path, got {value!r}")
        if int(every_n_epochs) != every_n_epochs or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be an integer >= 1, got {every_n_epochs}")
        if not top_r or any(int(r) != r or r < 1 for r in top_r):
            raise ValueError(f"top_r must be a non-empty list of integers >= 1, got {top_r}")
        if image_shape is not None and (len(image_shape) not in (2, 3) or any(int(s) < 1 for s in image_shape)):
            raise ValueError(f"image_shape must be (H, W) or (C, H, W) of positive sizes, got {image_shape}")
        self.reference, self.init = str(reference), str(init)
        self.every_n_epochs, self.top_r = int(every_n_epochs), tuple(int(r) for r in top_r)
        self.per_layer, self.filters = per_layer, filters
        self.image_shape = tuple(image_shape) if image_shape is not None else None
        self.history: list[dict[str, float]] = []
        self._init: Optional[Weights] = None
        self._reference: Optional[Weights] = None
        self._notes: set[str] = set()

    @property
    def init_weights(self) -> Optional[Weights]:
        """The kept initialization (layer name -> CPU weight); None before training starts and on ranks other than 0."""
        return self._init

    @property
    def reference_weights(self) -> Optional[Weights]:
        """The kept reference, as ``init_weights``."""
        return self._reference

    # --- state ---

    def state_dict(self) -> dict[str, Any]:
        if self._init is None or self._reference is None:
            return {}
        reference: Union[str, Weights] = "init" if self._reference is self._init else dict(self._reference)
        return {"init": dict(self._init), "reference": reference}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self._init = dict(state_dict["init"])
        self._reference = self._init if state_dict["reference"] == "init" else dict(state_dict["reference"])

    # --- hooks ---

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Takes the weights when training starts: after a resume's restore and every ``on_fit_start`` (a
        ``WeightsFromCheckpoint`` load), whatever the order of the callbacks."""
        if not trainer.is_global_zero:
            self._init = self._reference = None  # a resumed checkpoint's copies are rank 0's business
            return
        if self._init is None or self._reference is None:
            self._capture(pl_module)
        self._check_layers(pl_module)
        if trainer.global_step == 0:  # a new run (a resumed one has restored its step by now)
            self._measure_and_log(trainer, pl_module, epochs_done=0)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._measure_and_log(trainer, pl_module, epochs_done=trainer.current_epoch + 1)

    # --- measuring ---

    def metrics(self, pl_module: nn.Module) -> dict[str, float]:
        """The logged values for the module's current weights against the kept initialization and reference."""
        if self._init is None or self._reference is None:
            raise RuntimeError("FeaturePurificationProbe has no initialization or reference yet: they are taken "
                               "when training starts, or restored from a checkpoint")
        with torch.no_grad():
            return purification_metrics(self._live(pl_module), self._init, self._reference, self.top_r,
                                        self.per_layer)

    def _measure_and_log(self, trainer: L.Trainer, pl_module: L.LightningModule, epochs_done: int) -> None:
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        values = self.metrics(pl_module)
        self.history.append({"epoch": epochs_done, "step": step, **values})
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)
        writer = next((lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if self.filters and writer is not None:
            grid = self.filter_picture(trainer, pl_module)
            if grid is not None:
                writer.add_image(FILTERS_TAG, grid, step)
        if not trainer.loggers:
            self._note("no-logger", "FeaturePurificationProbe: the trainer has no logger; the values are only kept "
                       "in the callback's history")

    def filter_picture(self, trainer: Optional[L.Trainer], pl_module: nn.Module) -> Optional[Tensor]:
        """The first layer's filters (:func:`filter_grid`), or None (said once) when they are not images."""
        layers = probed_layers(backbone(pl_module)[0])
        if not layers:
            return None
        name, layer = next(iter(layers.items()))
        dims = self.image_shape or getattr(getattr(trainer, "datamodule", None), "dims", None)
        grid = filter_grid(layer.weight, dims)
        if grid is None:
            self._note("filters", f"FeaturePurificationProbe: the first layer {name} ({type(layer).__name__}, weight "
                       f"{tuple(layer.weight.shape)}) does not picture as images (image shape {dims}); "
                       "no filter picture is logged")
        return grid

    def _note(self, key: str, message: str) -> None:
        if key not in self._notes:
            self._notes.add(key)
            rank_zero_warn(message)

    @staticmethod
    def _live(pl_module: nn.Module) -> Weights:
        return {name: layer.weight.detach() for name, layer in probed_layers(backbone(pl_module)[0]).items()}

    @staticmethod
    def _copy(weights: Weights) -> Weights:
        return {name: w.detach().to("cpu", copy=True) for name, w in weights.items()}

    def _capture(self, pl_module: L.LightningModule) -> None:
        """Takes the reference and the initialization when training starts (rank 0, when not restored)."""
        model, prefix = backbone(pl_module)
        start = self._copy(self._live(pl_module))
        saved_init = None
        if self.reference == FIT_START:
            self._reference = start  # the same object as an initialization taken now: one copy, saved once
        else:
            checkpoint = read_checkpoint(self.reference)
            self._reference = self._from_state(checkpoint_weights(checkpoint, prefix), model, self.reference)
            saved_init = self._saved_init(checkpoint)
        if self.init == "auto":
            self._init = saved_init if saved_init is not None else start
            if saved_init is None and self.reference != FIT_START:
                rank_zero_warn(f"FeaturePurificationProbe: the reference {self.reference} holds no probe state; "
                               "the initialization is the weights when training starts")
        elif self.init == FIT_START:
            self._init = start
        else:
            checkpoint = read_checkpoint(self.init)
            saved = self._saved_init(checkpoint)
            self._init = saved if saved is not None else self._from_state(checkpoint_weights(checkpoint, prefix),
                                                                          model, self.init)
        rank_zero_info(f"FeaturePurificationProbe: {len(start)} layers, reference {self.reference}, "
                       f"initialization {'saved in the reference' if saved_init is not None else self.init}")

    def _saved_init(self, checkpoint: dict[str, Any]) -> Optional[Weights]:
        """The initialization a probe saved in a loaded checkpoint, if one did."""
        name = type(self).__qualname__
        for key, state in (checkpoint.get("callbacks") or {}).items():
            if (key == name or key.startswith(name + "{")) and isinstance(state, dict) and "init" in state:
                return {k: v.to("cpu") for k, v in state["init"].items()}
        return None

    @staticmethod
    def _from_state(state: Weights, model: nn.Module, source: str) -> Weights:
        """The probed layers' weights out of a backbone ``state_dict``."""
        missing = [_weight_key(name) for name in probed_layers(model) if _weight_key(name) not in state]
        if missing:
            raise ValueError(f"{source} has no weights for the layers {missing}")
        return {name: state[_weight_key(name)].to("cpu") for name in probed_layers(model)}

    def _check_layers(self, pl_module: nn.Module) -> None:
        live = self._live(pl_module)
        for label, kept in (("initialization", self._init), ("reference", self._reference)):
            wrong = [n for n in live if n not in kept or tuple(kept[n].shape) != tuple(live[n].shape)]
            if wrong or set(kept) - set(live):
                raise ValueError(f"FeaturePurificationProbe: the {label} does not match the model's layers: "
                                 f"{wrong or sorted(set(kept) - set(live))} (layer names or weight shapes differ)")
