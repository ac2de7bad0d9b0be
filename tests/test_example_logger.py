"""AdversarialExampleLogger: the grid and label table it writes to TensorBoard, read back from the event files."""

import io
import warnings

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from digits_bench import EPS, quiet_trainer, sgd
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import IMAGES, TENSORS, EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_robust.callbacks.example_logger import (AdversarialExampleLogger, amplified_perturbation, captioned_grid,
                                                 upsampled)
from lit_robust.defenses import StandardTraining
from lit_robust.models import SmallCNN

PAD = 2  # make_grid's default padding
SIZE = 64  # 8x8 images enlarged 8 times
GRID = 3 * (SIZE + PAD) + PAD  # the height of the three image rows, above the captions


def _module(**kwargs):
    L.seed_everything(0)
    model = kwargs.pop("model", None) or SmallCNN(width=4)
    return StandardTraining(model, **{"eps": EPS, "val_attack_steps": 3, "test_attack_steps": 3, "optimizer": sgd(),
                                      **kwargs})


def _trainer(tmp_path, logger, callbacks, **kwargs):
    return quiet_trainer(tmp_path, logger=logger, callbacks=callbacks, limit_train_batches=2, limit_val_batches=1,
                         limit_test_batches=1, **kwargs)


def _events(log_dir):
    acc = EventAccumulator(str(log_dir), size_guidance={IMAGES: 0, TENSORS: 0})
    acc.Reload()
    return acc


def _pixels(event) -> np.ndarray:
    """The decoded PNG as float [H, W, C] in 0..255."""
    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"), dtype=np.float64)


def _cell(grid: np.ndarray, row: int, col: int) -> np.ndarray:
    """The 8x8 image in a grid cell, after checking that it was enlarged by repeating each pixel 8x8 times."""
    top, left = PAD + row * (SIZE + PAD), PAD + col * (SIZE + PAD)
    cell = grid[top:top + SIZE, left:left + SIZE]
    assert np.array_equal(cell, cell[::8, ::8].repeat(8, 0).repeat(8, 1))
    return cell[::8, ::8]


def _caption(picture: np.ndarray, col: int) -> np.ndarray:
    """The strip below a column (its width, padding included)."""
    return picture[GRID:, col * (SIZE + PAD):(col + 1) * (SIZE + PAD) + PAD]


def _table(acc, tag) -> list[list[str]]:
    (event,) = acc.Tensors(f"{tag}/text_summary")[-1:]
    lines = event.tensor_proto.string_val[0].decode().splitlines()
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_grey_grid_labels_and_every_n_epochs(tmp_path, digits):
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = _trainer(tmp_path, logger, [AdversarialExampleLogger(every_n_epochs=2)], max_epochs=4)
    module = _module()
    trainer.fit(module, digits)
    acc = _events(logger.log_dir)
    images = acc.Images("adversarial_examples")
    assert [e.step for e in images] == [4, 8]  # after epochs 1 and 3 (2 steps each); none at the sanity check
    grid = _pixels(images[-1])
    assert grid.shape[0] > GRID and grid.shape[1:] == (8 * (SIZE + PAD) + PAD, 3)  # 8 columns of 64x64, captions below
    assert grid.shape[:2] == (images[-1].height, images[-1].width)

    x, y = (t[:8] for t in digits.splits["val"].tensors)  # the first validation images, in order
    for i in range(8):
        clean, adv, pert = (_cell(grid, row, i) for row in range(3))
        assert np.allclose(clean[..., 0], np.floor(x[i, 0].numpy() * 255), atol=1)
        assert (np.abs(adv - clean) <= EPS * 255 + 1).all()
        # Linf: 0.5 + delta / (2 eps), so the grey level encodes the pixel change (up to uint8 rounding).
        assert np.allclose(pert, 127.5 + (adv - clean) / (2 * EPS), atol=1.5 / (2 * EPS) + 1)
    assert (np.abs(_cell(grid, 2, 0)[..., 0] - 127.5) > 60).mean() > 0.3  # a real perturbation, not flat grey

    rows = _table(acc, "adversarial_examples/labels")
    assert [int(r[1]) for r in rows] == y.tolist() and [int(r[0]) for r in rows] == list(range(8))
    with torch.no_grad():
        assert [int(r[2]) for r in rows] == module.eval()(x).argmax(1).tolist()
    for i in range(8):  # each caption is drawn from its column's labels: equal pixels exactly when equal labels
        assert (_caption(grid, i) > 100).any()
        for j in range(i):
            assert np.array_equal(_caption(grid, i), _caption(grid, j)) == (rows[i][1:] == rows[j][1:])

    trainer.test(module, digits, verbose=False)  # inference mode: the attack still runs
    test_images = _events(logger.log_dir).Images("test/adversarial_examples")
    assert len(test_images) == 1 and _pixels(test_images[0]).shape == grid.shape


def test_rgb_images_and_l2_perturbations_scaled_per_image(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g))
    model = SmallCNN(in_channels=3, width=4, mean=(0.5,) * 3, std=(0.25,) * 3)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = _trainer(tmp_path, logger, [AdversarialExampleLogger(every_n_epochs=1, num_images=4)], max_epochs=1)
    loader = DataLoader(data, batch_size=8)
    trainer.fit(_module(model=model, eps=0.5, norm="l2"), loader, loader)
    (event,) = _events(logger.log_dir).Images("adversarial_examples")
    grid = _pixels(event)
    assert grid.shape[0] > GRID and grid.shape[1:] == (4 * (SIZE + PAD) + PAD, 3)
    for i in range(4):
        clean = _cell(grid, 0, i)
        assert np.allclose(clean, np.floor(data.tensors[0][i].permute(1, 2, 0).numpy() * 255), atol=1)
        deviation = np.abs(_cell(grid, 2, i) - 127.5)
        assert deviation.max() >= 127  # its largest pixel change is black or white
        assert (deviation > 3).mean() > 0.3


def test_upsampled_by_the_smallest_integer_factor_reaching_64_pixels():
    for side, factor in [(8, 8), (28, 3), (32, 2), (64, 1), (96, 1)]:
        images = torch.rand(2, 3, side, side + 5)
        big = upsampled(images)
        assert big.shape == (2, 3, side * factor, (side + 5) * factor)
        assert torch.equal(big[..., ::factor, ::factor], images)
        assert torch.equal(big, torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest"))


def test_captions_follow_the_predictions_under_their_own_column():
    rows = upsampled(torch.rand(6, 1, 8, 8))  # clean, adversarial, perturbation of 2 images
    y = clean = torch.tensor([3, 3])
    fooled = captioned_grid(rows, y, clean, torch.tensor([3, 5]))
    robust = captioned_grid(rows, y, clean, torch.tensor([3, 3]))
    assert fooled.shape == robust.shape and fooled.shape[0] > GRID and fooled.shape[1] == 2 * (SIZE + PAD) + PAD
    assert np.array_equal(fooled[:GRID], robust[:GRID])  # the images are untouched
    assert np.array_equal(_caption(robust, 0), _caption(robust, 1)) and (_caption(robust, 0) > 100).any()
    assert np.array_equal(_caption(fooled, 0), _caption(robust, 0))
    assert not np.array_equal(_caption(fooled, 1), _caption(robust, 1))  # "adv=5", in red, instead of "adv=3"
    red = [((c[..., 0] > 200) & (c[..., 1] < 80)).sum() for c in (_caption(fooled, 1), _caption(robust, 1))]
    assert red[0] > 0 and red[1] == 0


def test_amplified_perturbation_formula():
    delta = torch.tensor([[-0.1, 0.0, 0.05]]).view(1, 1, 1, 3)
    assert torch.allclose(amplified_perturbation(delta, 0.1, "linf").flatten(), torch.tensor([0.0, 0.5, 0.75]))
    assert torch.allclose(amplified_perturbation(2 * delta, 0.1, "linf").flatten(), torch.tensor([0.0, 0.5, 1.0]))
    assert torch.allclose(amplified_perturbation(delta, 123.0, "l2").flatten(), torch.tensor([0.0, 0.5, 0.75]))
    assert torch.equal(amplified_perturbation(torch.zeros(2, 3, 4, 4), 1.0, "l2"), torch.full((2, 3, 4, 4), 0.5))


def test_without_tensorboard_warns_once_and_logs_nothing(tmp_path, digits):
    callback = AdversarialExampleLogger(every_n_epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, CSVLogger(tmp_path), [callback], max_epochs=2).fit(_module(), digits)
    assert len([w for w in caught if "TensorBoardLogger" in str(w.message)]) == 1
    assert not list(tmp_path.rglob("events.out.tfevents*"))


def test_logging_does_not_change_the_run(tmp_path, digits):
    """The attack's random start comes from a forked generator: weights match a run without the callback."""
    weights = []
    for callbacks in ([], [AdversarialExampleLogger(every_n_epochs=1)]):
        module = _module()
        _trainer(tmp_path, TensorBoardLogger(tmp_path), callbacks, max_epochs=2).fit(module, digits)
        weights.append(torch.cat([p.detach().flatten() for p in module.parameters()]))
    assert torch.equal(*weights)


@pytest.mark.parametrize("kwargs, name", [({"every_n_epochs": 0}, "every_n_epochs"), ({"num_images": 0}, "num_images"),
                                          ({"every_n_epochs": 1.5}, "every_n_epochs")])
def test_refuses_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AdversarialExampleLogger(**kwargs)


class NoAttackModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(64, 10)


def test_needs_an_attack_when_the_module_has_none(tmp_path):
    with pytest.raises(ValueError, match="attack must be given"):
        AdversarialExampleLogger().setup(quiet_trainer(tmp_path), NoAttackModule(), "fit")
