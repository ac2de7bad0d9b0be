"""The GPU fast path, checked on CPU: bf16 autocast through every defense's step, channels_last weights and
inputs, and ``torch.compile`` of the backbone with input-gradient attacks still exact."""

import lightning.pytorch as L
import pytest
import torch
from digits_bench import ACCELERATORS, digits_for, quiet_trainer, tiny_defense, training_only_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_robust.attacks import PGD
from lit_robust.datamodules import DigitsDataModule
from lit_robust.defenses import CERTIFIED_DEFENSES, DEFENSES, PGDAT
from lit_robust.models import SmallCNN


class _Inputs(L.Callback):
    """Records the output dtype and the input memory format of the model's first conv at every call
    (from ``fit``, ``validate`` or ``test``)."""

    def __init__(self):
        self.channels_last, self.dtypes = [], set()

    def setup(self, trainer, pl_module, stage):
        first = next(m for m in pl_module.model.modules() if isinstance(m, torch.nn.Conv2d))
        first.register_forward_hook(self._record)

    def _record(self, module, inputs, output):
        self.dtypes.add(output.dtype)
        self.channels_last.append(inputs[0].is_contiguous(memory_format=torch.channels_last))


@pytest.mark.parametrize("accelerator", ACCELERATORS)
@pytest.mark.parametrize("name", [*DEFENSES, *CERTIFIED_DEFENSES])
def test_every_defense_trains_under_bf16_autocast(tmp_path, name, accelerator):
    module, seen = tiny_defense(name), _Inputs()
    trainer = training_only_trainer(tmp_path, max_steps=2, precision="bf16-mixed", callbacks=[seen],
                                    accelerator=accelerator)
    trainer.fit(module, digits_for(name, batch_size=16))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert torch.bfloat16 in seen.dtypes  # autocast really reached the network
    assert all(p.dtype == torch.float32 for p in module.parameters())  # master weights stay fp32


def test_channels_last_converts_weights_and_batches(tmp_path):
    seen = _Inputs()
    module = PGDAT(SmallCNN(width=4), eps=0.2, steps=2, step_size=0.1, channels_last=True)
    training_only_trainer(tmp_path, max_steps=2, callbacks=[seen]).fit(module, DigitsDataModule(batch_size=16))
    convs = [m.weight for m in module.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    # the epoch's input check (one forward), then per step: 2 attack steps + training
    assert len(seen.channels_last) == 1 + 2 * 3 and all(seen.channels_last)

    def step(channels_last):
        L.seed_everything(0)
        m = PGDAT(SmallCNN(width=4), eps=0.2, steps=2, step_size=0.1, channels_last=channels_last)
        training_only_trainer(tmp_path, max_steps=2).fit(m, DigitsDataModule(batch_size=16))
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    assert torch.allclose(step(True), step(False), atol=1e-5)  # same computation, another layout


def test_compiled_backbone_gives_the_eager_attack_and_checkpoints(tmp_path):
    """aot_eager traces forward and backward like inductor does, without needing a C++ compiler."""
    L.seed_everything(0)
    module = PGDAT(SmallCNN(width=4), eps=0.2, steps=3, step_size=0.1, compile_model={"backend": "aot_eager"})
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=1, enable_checkpointing=True, callbacks=[ckpt])
    trainer.fit(module, DigitsDataModule(batch_size=16))
    assert module.model._compiled_call_impl is not None  # the backbone really is compiled
    eager = SmallCNN(width=4)
    eager.load_state_dict(module.model.state_dict())  # same keys: compiling in place keeps them
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    attack = PGD(0.2, steps=3, step_size=0.1, random_start=False)
    module.model.eval(), eager.eval()
    assert torch.allclose(attack(module.model, x, y), attack(eager, x, y), atol=1e-6)
    restored = PGDAT.load_from_checkpoint(ckpt.last_model_path, model=SmallCNN(width=4))
    assert all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), module.state_dict().values()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (inductor's GPU kernels)")
def test_inductor_compiled_backbone_trains_and_gives_eager_input_gradients(tmp_path):
    """The real compiler on a GPU, in bf16 and channels_last: the input gradients the attacks follow match
    eager's (inductor fuses differently, so to a tolerance), and training moves the weights."""
    L.seed_everything(0)
    module = PGDAT(SmallCNN(width=4), eps=0.2, steps=3, step_size=0.1, compile_model=True, channels_last=True)
    before = [p.detach().clone() for p in module.model.parameters()]
    training_only_trainer(tmp_path, max_steps=3, accelerator="cuda", precision="bf16-mixed").fit(
        module, DigitsDataModule(batch_size=64))
    assert module.model._compiled_call_impl is not None
    assert any(not torch.equal(a, b.cuda()) for a, b in zip(module.model.parameters(), before))
    eager = SmallCNN(width=4).cuda().eval()
    eager.load_state_dict(module.model.state_dict())
    module.model.eval()
    x, y = torch.rand(64, 1, 8, 8, device="cuda", requires_grad=True), torch.randint(0, 10, (64,), device="cuda")
    grads = [torch.autograd.grad(torch.nn.functional.cross_entropy(m(x), y), x)[0] for m in (module.model, eager)]
    assert (grads[0] - grads[1]).norm() <= 1e-3 * grads[1].norm()


def test_fast_path_arguments_are_checked():
    with pytest.raises(ValueError, match="compile_model"):
        PGDAT(SmallCNN(width=4), compile_model="yes")


@pytest.mark.parametrize("name", ["PGDAT", "GaussianAugmentation"])  # the base's evaluation, and one of its own
@pytest.mark.parametrize("val_fp32", [True, False])
def test_validation_runs_in_fp32_under_bf16_unless_asked_not_to(tmp_path, name, val_fp32):
    module, seen = tiny_defense(name, val_fp32=val_fp32), _Inputs()
    trainer = quiet_trainer(tmp_path, limit_val_batches=1, precision="bf16-mixed", callbacks=[seen])
    (metrics,) = trainer.validate(module, DigitsDataModule(batch_size=16))
    assert seen.dtypes == ({torch.float32} if val_fp32 else {torch.bfloat16})
    assert 0 <= metrics["val/clean_acc"] <= 1
