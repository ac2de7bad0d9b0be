"""A small convolutional network for the digits quickstart and for fast tests."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from lit_robust.models.normalize import DIGITS_MEAN, DIGITS_STD, Normalize


class SmallCNN(nn.Module):
    """Two conv blocks (conv-BN-ReLU x2, max-pool) and a two-layer classifier head.

    With the default ``width=32`` it has about 0.1M parameters for 1x8x8 inputs; the input
    size only changes the head (``input_size`` must be divisible by 4).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: int = 8,
        width: int = 32,
        mean: Sequence[float] = DIGITS_MEAN,
        std: Sequence[float] = DIGITS_STD,
    ) -> None:
        super().__init__()
        if input_size % 4:
            raise ValueError(f"input_size must be divisible by 4, got {input_size}")
        if len(mean) != in_channels:
            raise ValueError(f"mean/std need one value per input channel ({in_channels}), got {len(mean)}")

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.normalize = Normalize(mean, std)
        self.features = nn.Sequential(
            *block(in_channels, width), *block(width, width), nn.MaxPool2d(2),
            *block(width, 2 * width), *block(2 * width, 2 * width), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * (input_size // 4) ** 2, 4 * width), nn.ReLU(inplace=True),
            nn.Linear(4 * width, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(self.normalize(x)))
