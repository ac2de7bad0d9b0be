"""The sample-dependent initialisation generator of FGSM-SDI (Jia et al., IEEE TIP 2022).

It lives with the models, not the attacks: it has trainable parameters, and attacks hold none
(DESIGN principle 1). ``lit_robust.defenses.fgsm_sdi.FGSMSDI`` trains it jointly with the
classifier. Architecture as in the official ``attacker.py`` (``One_Layer_Attacker`` with one
``GenBlock``), for any number of image channels::

    cat([x, sign(grad)])           2C channels, full resolution (no down-sampling)
    conv3x3(2C -> w, no bias), BN(eps=1e-3), ReLU
    + pre-activation residual block: [BN(affine=False), PReLU, conv3x3] x 2, identity shortcut
    BN(w, affine=False), conv3x3(w -> C, bias)
    eps * tanh(.)                  an Linf perturbation, |delta| <= eps everywhere
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class _PreActResidual(nn.Module):
    """x + conv(PReLU(BN(conv(PReLU(BN(x)))))), BatchNorm without affine parameters, convs with bias."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            nn.BatchNorm2d(width, affine=False), nn.PReLU(), nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width, affine=False), nn.PReLU(), nn.Conv2d(width, width, 3, padding=1),
        )
        for m in self.residual:
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight, gain=math.sqrt(2.0))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.residual(x)


class SDIGenerator(nn.Module):
    """Maps a clean batch and the sign of its input gradient to an initial perturbation in [-eps, eps].

    Args:
        eps: Linf radius of the output, in [0, 1] pixel units.
        in_channels: image channels C (3 for CIFAR, 1 for digits); the input has 2C channels.
        width: feature channels of the hidden layers (64 in the paper).

    ``forward(x, grad_sign) -> delta`` with ``delta`` of the shape of ``x``. The tanh runs in
    float32 even under autocast, so the bound holds exactly: ``|delta| <= eps``.
    """

    def __init__(self, eps: float, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if int(in_channels) != in_channels or in_channels < 1:
            raise ValueError(f"in_channels must be an integer >= 1, got {in_channels}")
        if int(width) != width or width < 1:
            raise ValueError(f"generator width must be an integer >= 1, got {width}")
        self.eps = float(eps)
        self.stem = nn.Sequential(
            nn.Conv2d(2 * in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width, eps=1e-3),
            nn.ReLU(inplace=True),
        )
        self.block = _PreActResidual(width)
        self.head = nn.Sequential(nn.BatchNorm2d(width, affine=False), nn.Conv2d(width, in_channels, 3, padding=1))

    def forward(self, x: Tensor, grad_sign: Tensor) -> Tensor:
        h = self.head(self.block(self.stem(torch.cat([x, grad_sign.to(x.dtype)], dim=1))))
        return self.eps * torch.tanh(h.float())
