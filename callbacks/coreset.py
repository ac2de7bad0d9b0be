"""Adversarial coreset selection (Dolatabadi, Erfani & Leckie, ECCV 2022 / IJCV 2023).

Official code: https://github.com/hmdolatabadi/ACS (``scripts/robust_train_linf.py`` and the CORDS
strategies it imports, ``cords/selectionstrategies/supervisedlearning/{craig,ompgradmatch}strategy.py``).

After ``T_w`` warm-up epochs on all the data, every ``R`` epochs the callback attacks the whole
training pool with the defense's own training attack, computes each example's gradient of the
adversarial cross-entropy with respect to the **last linear layer** in closed form
(``softmax(z) - onehot(y)`` for the bias, its outer product with the penultimate features for
the weight), and picks, class by class, a weighted subset of ``ceil(c * N * N_class / N)`` points
whose weighted gradient sum matches the class's:

* ``method="craig"``: greedy facility location on the similarity ``max(d) - d`` of squared
  gradient distances (CRAIG); a point's weight is the number of class members it is nearest to.
  The official runs use bias-only gradients for CRAIG (``linear_layer=False``).
* ``method="gradmatch"``: orthogonal matching pursuit with non-negative weights on the class's
  gradient sum (GradMatch, ``PerClassPerGradient``: the class's own bias entry and weight row).
  OMP stops when the residual vanishes or repeats a pick, so it may keep fewer points than the
  budget, as the official solver does.

**How the weights enter the loss.** The official loop takes ``sum_i w_i l_i / sum_i w_i`` over
each mini-batch of the subset. The defenses here compute batch means, so the callback serves the
training loader instead with ``|S|`` draws per epoch from the subset, with replacement and in
proportion to the weights: the expected batch gradient is the same weighted mean, and every
automatic-optimization defense (PGD-AT, TRADES, MART, ...) works unchanged. ``weighting="none"``
serves each selected point once per epoch, unweighted.

**Schedule.** ``T_w = round(c * int(kappa * E))`` with ``E = max_epochs`` (or ``warmup_epochs``);
selections at epochs ``T_w, T_w + R, T_w + 2R, ...``. The official "-Warm" loop also idles
(trains nothing) for epochs ``T_w .. int(kappa * E) - 1``; those epochs only shift its learning-rate
clock, so a run here reproduces it with ``max_epochs = E - int(kappa * E) + T_w`` and the
milestones shifted by the same amount (``configs/cifar10/pgd_at_coreset.yaml``).

**Mechanics.** The callback wraps the DataModule's ``train_dataloader`` and sets
``reload_dataloaders_every_n_epochs=1`` (if it was 0), so each epoch's loader is built at the epoch
start, off the training step; a selection that falls due is computed there. Under DDP the
selection runs on rank 0 and is broadcast; the draws are seeded by ``(seed, epoch)``, so every rank
sees the same order before Lightning's distributed sampler splits it. The selection (indices,
weights, epoch) lives in the callback's ``state_dict`` (plain tensors and ints), so a resumed run
serves the same subset.

Cost: ``c`` of the full-data epochs after warm-up, plus per selection one training attack and one
forward over the pool (about one full-data epoch).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

METHODS = ("craig", "gradmatch")


def last_linear(model: nn.Module) -> nn.Linear:
    """The model's last ``nn.Linear`` (registration order): the logits layer of our backbones."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TypeError(f"{type(model).__name__} has no nn.Linear logits layer for last-layer gradients")
    return linears[-1]


def last_layer_gradients(logits: Tensor, features: Optional[Tensor], y: Tensor) -> Tensor:
    """Per-example gradients of ``CE(logits, y)`` with respect to the logits layer, in closed form.

    Returns ``[dL/db | dL/dW]`` flattened (``W`` row-major, shape ``C x D``), or ``dL/db`` alone when
    ``features`` is None: ``dL/db = softmax(z) - onehot(y)`` and ``dL/dW = dL/db (outer) h``.
    """
    bias = logits.float().softmax(1) - F.one_hot(y, logits.shape[1]).float()
    if features is None:
        return bias
    weight = bias.unsqueeze(2) * features.float().flatten(1).unsqueeze(1)
    return torch.cat([bias, weight.flatten(1)], dim=1)


def craig(grads: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Greedy facility location (CRAIG) on ``max(d) - d``, squared Euclidean ``d``; weights = cluster sizes."""
    n = grads.shape[0]
    k = min(k, n)
    dist = torch.cdist(grads, grads).pow(2)
    sim = dist.max() - dist
    best = torch.zeros(n, dtype=sim.dtype, device=sim.device)
    chosen: list[int] = []
    available = torch.ones(n, dtype=torch.bool, device=sim.device)
    for _ in range(k):
        gain = torch.clamp(sim - best.unsqueeze(0), min=0).sum(1)
        gain[~available] = -1.0
        pick = int(gain.argmax())
        chosen.append(pick)
        available[pick] = False
        best = torch.maximum(best, sim[pick])
    idx = torch.tensor(chosen, dtype=torch.long, device=grads.device)
    nearest = sim[idx].argmax(0)
    weights = torch.bincount(nearest, minlength=len(chosen)).to(grads.dtype)
    return idx, weights


def _ridge_solve(a: Tensor, b: Tensor, lam: float) -> Tensor:
    gram = a @ a.T + lam * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    return torch.linalg.lstsq(gram, (a @ b).unsqueeze(1)).solution.squeeze(1)


def gradmatch(grads: Tensor, k: int, lam: float = 0.0, tol: float = 1e-100) -> tuple[Tensor, Tensor]:
    """Non-negative orthogonal matching pursuit of ``sum_i g_i`` by at most ``k`` of the ``g_i`` (GradMatch).

    Picks the column most positively correlated with the residual, refits the weights by (ridge)
    least squares on the picks, drops the most negative weight while any is negative; stops at
    ``k`` picks, a vanishing residual, or a repeated pick.
    """
    a = grads.double()  # rows are candidates
    target = a.sum(0)
    norm_b = target.norm().clamp_min(1e-300)
    resid = target.clone()
    picks: list[int] = []
    weights = torch.zeros(0, dtype=a.dtype, device=a.device)
    for _ in range(min(k, a.shape[0])):
        if float(resid.norm() / norm_b) < tol:
            break
        pick = int((a @ resid).argmax())
        if pick in picks:
            break
        picks.append(pick)
        weights = _ridge_solve(a[picks], target, lam)
        while len(picks) > 1 and float(weights.min()) < 0:
            picks.pop(int(weights.argmin()))
            weights = _ridge_solve(a[picks], target, lam)
        resid = target - a[picks].T @ weights
    idx = torch.tensor(picks, dtype=torch.long, device=grads.device)
    return idx, weights.clamp_min(0).to(grads.dtype)


def select_per_class(grads: Tensor, labels: Tensor, fraction: float, method: str,
                     num_features: Optional[int] = None, lam: float = 0.0) -> tuple[Tensor, Tensor]:
    """Per-class selection with budget ``ceil(int(fraction * N) * N_c / N)``; returns pool indices, weights.

    For GradMatch with full last-layer gradients (``num_features`` given) each class uses only its own
    bias entry and weight row, as the official ``PerClassPerGradient`` selection does.
    """
    n = len(labels)
    budget = int(fraction * n)
    indices, weights = [], []
    for c in labels.unique(sorted=True).tolist():
        members = (labels == c).nonzero().squeeze(1)
        g = grads[members]
        if method == "gradmatch" and num_features is not None:
            num_classes = g.shape[1] // (num_features + 1)
            rows = g[:, num_classes:].reshape(len(g), num_classes, num_features)[:, c]
            g = torch.cat([g[:, c:c + 1], rows], dim=1)
        k = math.ceil(budget * len(members) / n)
        idx, w = (craig if method == "craig" else lambda g_, k_: gradmatch(g_, k_, lam))(g, k)
        indices.append(members[idx])
        weights.append(w)
    return torch.cat(indices), torch.cat(weights)


class CoresetSampler(Sampler[int]):
    """``len(indices)`` draws per epoch from the selected indices: in proportion to ``weights`` with
    replacement, or a permutation when ``weights`` is None; seeded by ``seed + epoch`` (rank-consistent)."""

    def __init__(self, indices: Tensor, weights: Optional[Tensor], seed: int, epoch: int) -> None:
        self.indices, self.weights, self.seed, self.epoch = indices.cpu(), weights, seed, epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.weights is None:
            order = torch.randperm(len(self.indices), generator=gen)
        else:
            order = torch.multinomial(self.weights.cpu().double(), len(self.indices), replacement=True, generator=gen)
        return iter(self.indices[order].tolist())


class AdversarialCoresetSelection(L.Callback):
    """Trains an automatic-optimization defense on an adversarial coreset after a full-data warm-up.

    Args:
        fraction: coreset size ``c`` as a fraction of the training set, in (0, 1].
        every_n_epochs: selection period ``R`` (the official ``freq`` / ``select_every``).
        warmup_fraction: ``kappa``; warm-up ``T_w = round(c * int(kappa * max_epochs))`` full-data epochs.
        warmup_epochs: sets ``T_w`` directly (overrides ``warmup_fraction``).
        method: "craig" (greedy facility location) or "gradmatch" (non-negative OMP).
        gradients: "bias" (``softmax - onehot``) or "last_layer" (bias and weight); default: the
            official choice, "bias" for CRAIG and "last_layer" for GradMatch.
        weighting: "sample" (draws in proportion to the weights) or "none" (the subset, unweighted).
        lam: GradMatch's ridge term (official ``lam``, 0 in its configs).
        batch_size: pool batch size for the selection pass (default: the training loader's).
        seed: of the weighted draws (each epoch adds its index).
    """

    def __init__(self, fraction: float = 0.5, every_n_epochs: int = 20, warmup_fraction: float = 0.5,
                 warmup_epochs: Optional[int] = None, method: str = "craig", gradients: Optional[str] = None,
                 weighting: str = "sample", lam: float = 0.0, batch_size: Optional[int] = None, seed: int = 0) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if not 0 <= warmup_fraction <= 1:
            raise ValueError(f"warmup_fraction must be in [0, 1], got {warmup_fraction}")
        if warmup_epochs is not None and warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0 or None, got {warmup_epochs}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        gradients = gradients or ("bias" if method == "craig" else "last_layer")
        if gradients not in ("bias", "last_layer"):
            raise ValueError(f"gradients must be 'bias' or 'last_layer', got {gradients!r}")
        if weighting not in ("sample", "none"):
            raise ValueError(f"weighting must be 'sample' or 'none', got {weighting!r}")
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        self.fraction, self.every_n_epochs, self.warmup_fraction = fraction, every_n_epochs, warmup_fraction
        self.warmup_epochs, self.method, self.gradients, self.weighting = warmup_epochs, method, gradients, weighting
        self.lam, self.batch_size, self.seed = lam, batch_size, seed
        self.indices: Optional[Tensor] = None
        self.weights: Optional[Tensor] = None
        self.selected_at = -1
        self.selections = 0
        self.selection_examples = 0  # pool examples attacked for selection (cost accounting)
        self._original = None

    # schedule
    def warmup(self, trainer: L.Trainer) -> int:
        if self.warmup_epochs is not None:
            return self.warmup_epochs
        return round(self.fraction * int(self.warmup_fraction * (trainer.max_epochs or 0)))

    def due_epoch(self, trainer: L.Trainer, epoch: int) -> Optional[int]:
        """The latest selection epoch at or before ``epoch`` (None during warm-up)."""
        start = self.warmup(trainer)
        if epoch < start:
            return None
        return start + (epoch - start) // self.every_n_epochs * self.every_n_epochs

    # wiring
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        dm = trainer.datamodule
        if dm is None:
            raise TypeError("AdversarialCoresetSelection needs a LightningDataModule (trainer.fit(module, datamodule))")
        if not pl_module.automatic_optimization:
            raise TypeError(f"AdversarialCoresetSelection works with automatic-optimization defenses; "
                            f"{type(pl_module).__name__} uses manual optimization")
        if trainer.reload_dataloaders_every_n_epochs == 0:
            trainer.reload_dataloaders_every_n_epochs = 1
        self._original = dm.train_dataloader
        dm.train_dataloader = lambda: self._loader(trainer, pl_module)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self._original is not None and trainer.datamodule is not None:
            del trainer.datamodule.train_dataloader  # back to the class's method
            self._original = None

    def _loader(self, trainer: L.Trainer, pl_module: L.LightningModule) -> DataLoader:
        full = self._original()
        if not isinstance(full, DataLoader):
            raise TypeError(f"AdversarialCoresetSelection needs a torch DataLoader over a map-style dataset, got "
                            f"{type(full).__name__} (for ImageDataModule, set on_device=False)")
        epoch = trainer.current_epoch
        due = self.due_epoch(trainer, epoch)
        if due is None:
            return full
        if self.selected_at != due or self.indices is None:
            self.select(trainer, pl_module, full.dataset, full.batch_size or 1)
            self.selected_at = due
        weights = self.weights if self.weighting == "sample" else None
        return DataLoader(full.dataset, batch_size=full.batch_size, sampler=CoresetSampler(self.indices, weights,
                          self.seed, epoch), num_workers=full.num_workers, collate_fn=full.collate_fn,
                          pin_memory=full.pin_memory, drop_last=full.drop_last)

    # selection
    def select(self, trainer: L.Trainer, pl_module: L.LightningModule, dataset: Dataset, batch_size: int) -> None:
        result = None
        if trainer.global_rank == 0:
            result = self.compute_selection(pl_module, dataset, self.batch_size or batch_size)
        if trainer.world_size > 1:
            result = trainer.strategy.broadcast(result, src=0)
        self.indices, self.weights = result
        self.selections += 1
        self.selection_examples += len(dataset)

    def compute_selection(self, pl_module: L.LightningModule, dataset: Dataset,
                          batch_size: int) -> tuple[Tensor, Tensor]:
        model = pl_module.model
        layer = last_linear(model)
        captured: dict[str, Tensor] = {}
        hook = layer.register_forward_hook(lambda m, args, out: captured.__setitem__("h", args[0].detach()))
        device = pl_module.device
        flags = {m: m.training for m in model.modules()}
        grads, labels = [], []
        try:
            for x, y, *_ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
                x, y = x.to(device), y.to(device)
                with torch.enable_grad():
                    x_adv = pl_module.perturb(x, y).detach()
                model.eval()
                with torch.no_grad():
                    logits = model(x_adv)
                for m, flag in flags.items():
                    m.train(flag)
                features = captured["h"] if self.gradients == "last_layer" else None
                grads.append(last_layer_gradients(logits, features, y))
                labels.append(y)
        finally:
            hook.remove()
            for m, flag in flags.items():
                m.train(flag)
        num_features = layer.in_features if self.gradients == "last_layer" else None
        indices, weights = select_per_class(torch.cat(grads), torch.cat(labels), self.fraction, self.method,
                                            num_features, self.lam)
        return indices.cpu(), weights.float().cpu()

    # checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"indices": self.indices, "weights": self.weights, "selected_at": self.selected_at,
                "selections": self.selections, "selection_examples": self.selection_examples}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.indices, self.weights = state_dict["indices"], state_dict["weights"]
        self.selected_at, self.selections = state_dict["selected_at"], state_dict["selections"]
        self.selection_examples = state_dict["selection_examples"]
