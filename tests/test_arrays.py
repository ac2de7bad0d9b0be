"""The uint8-array base of the image DataModules: batched augmentation, GPU-resident batches, splits."""

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from digits_bench import ACCELERATORS, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_robust.datamodules.arrays import ArrayDataset, DeviceBatches, ImageDataModule, held_out_split, random_crop_flip
from lit_robust.defenses import PGDAT
from lit_robust.models import SmallCNN


class MemoryImages(ImageDataModule):
    """Random 3x8x8 uint8 images held in memory: the base's code paths without files."""

    num_classes, dims, pad = 4, (3, 8, 8), 2

    def download(self) -> None:
        pass

    def verify(self) -> None:
        pass

    def load(self, split):
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        n = 60 if split == "train" else 20
        return torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(n) % 4


def _cnn() -> SmallCNN:
    return SmallCNN(in_channels=3, num_classes=4, input_size=8, width=4, mean=(0.5,) * 3, std=(0.25,) * 3)


def _windows(image: torch.Tensor, pad: int) -> list[torch.Tensor]:
    padded = torch.nn.functional.pad(image[None], (pad,) * 4, mode="reflect")[0]
    h, w = image.shape[1:]
    return [padded[:, i:i + h, j:j + w] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]


def test_random_crop_flip_draws_every_window_and_mirror_per_image():
    image = torch.rand(1, 3, 6, 6)
    views = random_crop_flip(image.expand(3000, -1, -1, -1), pad=2, flip=True)
    windows = _windows(image[0], 2)
    seen = set()
    for view in views[:600]:
        matches = [k for k, w in enumerate(windows) if torch.equal(view, w)] + \
                  [100 + k for k, w in enumerate(windows) if torch.equal(view, w.flip(-1))]
        assert matches, "every view is a window of the reflect-padded image, possibly mirrored"
        seen.update(matches)
    assert len({k % 100 for k in seen}) == 25 and any(k >= 100 for k in seen) and any(k < 100 for k in seen)


def test_random_crop_without_flip_never_mirrors_and_zero_pad_is_identity():
    image = torch.rand(1, 1, 5, 5)
    views = random_crop_flip(image.expand(200, -1, -1, -1), pad=1, flip=False)
    windows = _windows(image[0], 1)
    assert all(any(torch.equal(v, w) for w in windows) for v in views)
    assert torch.equal(random_crop_flip(image, pad=0, flip=False), image)


def test_array_dataset_gives_unit_floats_and_checks_its_input():
    images = torch.tensor([[[[0, 255], [51, 102]]]], dtype=torch.uint8)
    x, y = ArrayDataset(images, torch.tensor([3]))[0]
    assert x.dtype == torch.float32 and torch.allclose(x, torch.tensor([[[0.0, 1.0], [0.2, 0.4]]])) and y == 3
    with pytest.raises(ValueError, match="uint8"):
        ArrayDataset(images.float(), torch.tensor([3]))


def test_held_out_split_is_rice_generate_validation():
    train, val = held_out_split(50, 10, seed=0)
    order = np.random.RandomState(0).permutation(50)
    assert val.tolist() == order[:10].tolist() and train.tolist() == sorted(order[10:].tolist())
    assert held_out_split(50, 10, seed=1)[1].tolist() != val.tolist()


def test_device_batches_shard_ranks_and_reshuffle_per_epoch():
    images, labels = torch.zeros(23, 1, 2, 2, dtype=torch.uint8), torch.arange(23)
    epoch = {"now": 0}
    ranks = [DeviceBatches(images, labels, 4, shuffle=True, seed=5, rank=r, world_size=3, epoch_fn=lambda: epoch["now"])
             for r in range(3)]
    seen = [torch.cat([y for _, y in rank]) for rank in ranks]
    assert [len(s) for s in seen] == [8, 8, 8] and all(len(rank) == 2 for rank in ranks)
    assert set(torch.cat(seen).tolist()) == set(range(23))  # padded by one repeat, as DistributedSampler does
    assert torch.equal(torch.cat([y for _, y in ranks[0]]), seen[0])  # same epoch, same order
    epoch["now"] = 1
    assert not torch.equal(torch.cat([y for _, y in ranks[0]]), seen[0])
    x, _ = next(iter(ranks[0]))
    assert x.dtype == torch.float32 and x.shape == (4, 1, 2, 2)
    plain = DeviceBatches(images, labels, 10, shuffle=False)
    assert torch.equal(torch.cat([y for _, y in plain]), labels)


@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_on_device_mode_serves_the_same_splits_without_a_dataloader(tmp_path, accelerator):
    dm = MemoryImages(val_size=12, batch_size=16, on_device=True, augment=False)
    module = PGDAT(_cnn(), eps=8 / 255, steps=1,
                   val_attack_steps=1, test_attack_steps=1)
    trainer = quiet_trainer(tmp_path, max_epochs=1, accelerator=accelerator)
    trainer.fit(module, dm)
    loader = dm.train_dataloader()
    assert isinstance(loader, DeviceBatches) and len(loader) == 3  # 48 training images / 16
    assert all(x.device.type == y.device.type == accelerator for x, y in loader)  # no copy per step
    assert sorted(torch.cat([y for _, y in loader]).tolist()) == sorted(dm.arrays["train"][1].tolist())
    val_x = torch.cat([x for x, _ in dm.val_dataloader()]).cpu()
    assert torch.equal(val_x, dm.arrays["val"][0].cpu().float() / 255)
    assert trainer.callback_metrics["val/robust_acc"] >= 0


def test_on_device_run_resumes_exactly(tmp_path):
    """The on-device shuffling follows the epoch, also when a resumed run sets its data up."""
    def module():
        L.seed_everything(0)
        return PGDAT(_cnn(), eps=8 / 255, steps=1,
                     val_attack_steps=1, optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                     lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1))

    def data():
        return MemoryImages(val_size=12, batch_size=16, on_device=True)

    straight = module()
    quiet_trainer(tmp_path / "a", max_epochs=3).fit(straight, data())
    first = module()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    quiet_trainer(tmp_path / "b", max_epochs=2, enable_checkpointing=True, callbacks=[ckpt]).fit(first, data())
    resumed = module()
    quiet_trainer(tmp_path / "c", max_epochs=3).fit(resumed, data(), ckpt_path=ckpt.last_model_path)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
