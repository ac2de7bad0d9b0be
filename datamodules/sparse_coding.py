"""Feature Purification's theory task: sparse-coding data ``x = M z + xi``, labels ``sign(<w*, z>)``.

Allen-Zhu & Li, "Feature Purification: How Adversarial Training Performs Robust Deep Learning", FOCS 2021
(arXiv 2005.10190; no official code). Generated in memory, seeded, no download.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from lit_robust.datamodules.base import SplitDataModule

SPLITS = ("train", "val", "test")


class SparseCodingDataModule(SplitDataModule):
    """``x = M z + xi`` in ``R^d`` with ``y = sign(<w*, z>)``, served as [0, 1] vectors ``0.5 + scale * x``.

    * ``M``: a random orthogonal (unitary) ``d x d`` dictionary, atoms in columns (QR of a Gaussian matrix with
      the signs fixed, i.e. Haar-distributed).
    * ``z``: each coordinate non-zero with probability ``k / d`` (``k`` non-zeros on average), of magnitude
      uniform in ``[z_min, 1]`` (bounded) and a random sign.
    * ``xi``: dense Gaussian noise, ``noise`` per coordinate (``||xi|| ~ noise * sqrt(d)``).
    * ``w*``: dense, ``+-1`` per coordinate (Rademacher). Dense matters: the label then correlates with every
      atom, so the Bayes linear direction ``M w*`` is spread over all of them (a linear classifier's L2 margin
      is ``|<w*, z>| / sqrt(d)``), while a network that decodes ``z`` atom by atom keeps a margin of order
      ``|<w*, z>| / sqrt(k)``.
    * ``y``: class 1 for ``<w*, z> > 0``, class 0 otherwise. Codes with ``|<w*, z>| < min_margin`` are redrawn
      (rejection sampling), so the classes are separated; the classes are balanced in expectation.

    Every value is ours (the paper's constants were not retrieved): ``d = 100``, ``k = 4``, ``z_min = 0.5``,
    ``noise = 0.02``, ``min_margin = 1``. With them, at L2 radius 0.3, an oracle network (``w_i = w*_i M_i``,
    threshold 0.05) keeps 99.9-100% PGD accuracy and the Bayes linear classifier ``<M w*, x>`` 10-11% (seeds 0-2,
    ``scripts/feature_purification_theory.py``).

    Units. Pixels live in [0, 1] in this library, so batches are ``0.5 + scale * x`` and the models undo the
    map (:class:`~lit_robust.models.SymmetricReLUNet`). A radius ``r`` in the task's units is ``r * scale`` in
    [0, 1] units (:meth:`pixel_radius`); attacks take the latter. ``setup`` checks that every value lies inside
    (0, 1) and records :attr:`max_radius`, the largest task radius at which no perturbation of any example can
    reach the box (an L2 ball of radius ``r`` moves a coordinate by at most ``r``): below it the box never binds
    and the threat model is the plain L2 ball.

    Args:
        dim: ``d``.
        k: the expected number of non-zero coordinates of ``z``, in ``(0, d]``.
        noise: the standard deviation of each coordinate of ``xi``.
        z_min: the smallest magnitude of a non-zero coordinate, in ``[0, 1]``.
        min_margin: codes with ``|<w*, z>|`` below it are redrawn (> 0: zero-margin codes have no label).
        n_train, n_val, n_test: examples per split (validation for model selection; never select on test).
        scale: the map to [0, 1] units, ``0.5 + scale * x``.
        seed: of ``M``, ``w*`` and every split. Each split has its own generator (derived from ``seed``), so
            changing ``n_train`` leaves ``M``, ``w*`` and the other splits as they were.
        batch_size, eval_batch_size, num_workers: as in ``SplitDataModule``.

    After ``setup``: :attr:`dictionary` (``M``), :attr:`w_star`, ``codes[split]`` (``z``), ``splits[split]``
    (a ``TensorDataset`` of float32 [N, d] inputs and int64 labels), :attr:`max_radius`.
    """

    center = 0.5

    def __init__(self, dim: int = 100, k: float = 4.0, noise: float = 0.02, z_min: float = 0.5,
                 min_margin: float = 1.0, n_train: int = 4000, n_val: int = 1000, n_test: int = 1000,
                 scale: float = 0.1, seed: int = 0, batch_size: int = 100, eval_batch_size: Optional[int] = None,
                 num_workers: int = 0) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers)
        if int(dim) != dim or dim < 2:
            raise ValueError(f"dim must be an integer >= 2, got {dim}")
        if not 0 < k <= dim:
            raise ValueError(f"k must be in (0, dim={dim}], got {k}")
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        if not 0 <= z_min <= 1:
            raise ValueError(f"z_min must be in [0, 1], got {z_min}")
        if not min_margin > 0:
            raise ValueError(f"min_margin must be > 0, got {min_margin}")
        for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            if int(n) != n or n < (0 if name == "n_val" else 1):
                raise ValueError(f"{name} must be an integer >= {0 if name == 'n_val' else 1}, got {n}")
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.save_hyperparameters()
        self.dim, self.k, self.noise, self.z_min, self.min_margin = int(dim), float(k), float(noise), z_min, min_margin
        self.sizes = {"train": int(n_train), "val": int(n_val), "test": int(n_test)}
        self.scale, self.seed = float(scale), int(seed)
        self.codes: dict[str, Tensor] = {}
        self._dictionary: Optional[Tensor] = None
        self._w_star: Optional[Tensor] = None
        self.max_radius: float = 0.0  #: set by ``setup``: the largest task radius at which the box cannot bind

    # --- the task ----------------------------------------------------------------------------

    @property
    def dictionary(self) -> Tensor:
        """``M`` [d, d], orthogonal, atoms in columns (generated on first use)."""
        if self._dictionary is None:
            self._draw_task()
        return self._dictionary

    @property
    def w_star(self) -> Tensor:
        """``w*`` [d], entries ``+-1``."""
        if self._w_star is None:
            self._draw_task()
        return self._w_star

    def _generators(self) -> dict[str, torch.Generator]:
        """One generator for the task (``M``, ``w*``) and one per split, each seeded from ``seed``."""
        seeds = torch.randint(0, 2**62, (1 + len(SPLITS),), generator=torch.Generator().manual_seed(self.seed))
        names = ("task",) + SPLITS
        return {name: torch.Generator().manual_seed(int(s)) for name, s in zip(names, seeds.tolist())}

    def _draw_task(self) -> None:
        g = self._generators()["task"]
        q, r = torch.linalg.qr(torch.randn(self.dim, self.dim, generator=g, dtype=torch.float64))
        self._dictionary = (q * torch.sign(torch.diagonal(r))).float()  # signs fixed: Haar-distributed
        self._w_star = (torch.randint(0, 2, (self.dim,), generator=g) * 2 - 1).float()

    def sample_codes(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` codes ``z`` [n, d] with ``|<w*, z>| >= min_margin``, by rejection from ``generator``."""
        kept, found = [], 0
        for _ in range(1000):
            m = 2 * (n - found) + 64
            active = torch.rand(m, self.dim, generator=generator) < self.k / self.dim
            magnitude = self.z_min + (1 - self.z_min) * torch.rand(m, self.dim, generator=generator)
            sign = torch.randint(0, 2, (m, self.dim), generator=generator) * 2 - 1
            z = active * magnitude * sign
            z = z[(z @ self.w_star).abs() >= self.min_margin]
            kept.append(z)
            found += len(z)
            if found >= n:
                return torch.cat(kept)[:n]
        raise ValueError(f"min_margin={self.min_margin} is too large for k={self.k}, z_min={self.z_min}: almost no "
                         "code reaches it")

    # --- the splits --------------------------------------------------------------------------

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits:
            return
        generators = self._generators()
        largest = 0.0
        for split in SPLITS:
            g = generators[split]
            z = self.sample_codes(self.sizes[split], g)
            x = z @ self.dictionary.T + self.noise * torch.randn(len(z), self.dim, generator=g)
            pixels = self.center + self.scale * x
            if len(x):
                largest = max(largest, (pixels - self.center).abs().max().item())
            self.codes[split] = z
            self.splits[split] = TensorDataset(pixels, (z @ self.w_star > 0).long())
        if largest >= self.center:
            raise ValueError(f"scale={self.scale} maps the data outside (0, 1) (a value {largest:.3g} from 0.5): "
                             f"take scale below {self.scale * self.center / largest:.3g}")
        self.max_radius = (self.center - largest) / self.scale

    def pixel_radius(self, r: float) -> float:
        """The task radius ``r`` in [0, 1] units (``r * scale``), after checking that the box cannot bind at it."""
        if not r > 0:
            raise ValueError(f"r must be > 0, got {r}")
        self.setup()
        if r >= self.max_radius:
            raise ValueError(f"r={r} reaches the [0, 1] box from some example (max_radius={self.max_radius:.4g}): "
                             "attacks would be clamped; take a smaller scale")
        return r * self.scale

    def tensors(self, split: str) -> tuple[Tensor, Tensor]:
        """The whole split: [0, 1] inputs [N, d] and labels [N]."""
        self.setup()
        return self.splits[split].tensors
