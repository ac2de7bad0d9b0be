"""The benchmark's plain-PyTorch loop does the same work as the library, so its time ratio measures only
the framework's overhead: per training step, both run the same convolutions, matrix products and batch norms,
forward and backward, in the number the cost model counts."""

import importlib.util
from pathlib import Path

import pytest
import torch
from digits_bench import OpLog, training_only_trainer

_spec = importlib.util.spec_from_file_location("throughput", Path(__file__).parents[1] / "benchmarks" / "throughput.py")
throughput = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(throughput)

COMPUTE = ("convolution", "convolution_backward", "addmm", "mm", "native_batch_norm", "_native_batch_norm_legit",
           "native_batch_norm_backward")


def _compute_op(func, args):
    """The compute-bound aten ops (forward and backward); a convolution's backward by which gradients it computes
    (input, weight, bias), so an attack that also computed weight gradients shows."""
    name = func.overloadpacket.__name__
    if name == "convolution_backward":
        name += str(tuple(args[-1]))  # output_mask
    return name if name.startswith(COMPUTE) else None


def _tiny_model():
    return throughput.MODELS["smallcnn"]()


def _batch():
    (batch,) = throughput.synthetic_batches(1, 8, torch.device("cpu"), channels_last=False)
    return batch


def library_ops(defense, tmp_path):
    module = throughput.library_module(defense, _tiny_model())
    ops = OpLog(_compute_op)

    class Record(throughput.L.Callback):
        """The second step: the first batch of an epoch also runs the input check's forward."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 1:
                ops.__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 1:
                ops.__exit__(None, None, None)

    trainer = training_only_trainer(tmp_path, max_steps=2, precision="32-true", callbacks=[Record()])
    trainer.fit(module, train_dataloaders=throughput._Batches([_batch(), _batch()]))
    return ops.counts


def plain_ops(defense):
    model = _tiny_model()
    optimizer = throughput.sgd(model.parameters())
    x, y = _batch()
    with OpLog(_compute_op) as ops:
        throughput.plain_step(defense, model, optimizer, x, y)
    return ops.counts


# per step: attack forward+backward passes (input gradients only), forwards without gradient, and forward+backward
# passes of the training loss (weight gradients): PGD-10 AT, FGSM-RS, and TRADES (clean target, clean + adversarial)
PASSES = {"pgdat": (10, 0, 1), "fastat": (1, 0, 1), "trades": (10, 1, 2)}


@pytest.mark.parametrize("defense", list(throughput.COST_IN_FORWARDS))
def test_plain_loop_does_the_library_work(tmp_path, defense):
    library, plain = library_ops(defense, tmp_path), plain_ops(defense)
    assert library == plain
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in _tiny_model().modules())
    attack, no_grad, training = PASSES[defense]
    assert library["convolution"] == (attack + no_grad + training) * convs
    assert library["convolution_backward(True, False, False)"] == attack * convs
    weight_grads = sum(n for op, n in library.items() if op.startswith("convolution_backward(") and ", True," in op)
    assert weight_grads == training * convs
