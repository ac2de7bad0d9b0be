"""Command line: ``lit-robust fit --config configs/quickstart.yaml`` (``python train.py`` is the same).

A ``LightningCLI`` over every ``AdversarialModule`` and every ``LightningDataModule``
(choose them by ``class_path`` in the config), plus one option of ours: ``--test_after_fit``
runs ``trainer.test`` right after ``fit`` and prints a summary line. It tests the best
checkpoint when a ``ModelCheckpoint`` monitors a validation metric (selection on the
held-out validation split, as Rice et al. recommend), else the final weights.

``lit-robust evaluate --config <run's config.yaml> --ckpt <checkpoint> --out <folder>`` runs
the full evaluation (:func:`lit_robust.evaluation.evaluate`) on the run's test split and
writes the report; ``--export <folder>`` also writes the classifier as plain PyTorch; progress
bars show on a terminal unless ``--quiet``.

The console script exits with status 0 on success and non-zero on an error. From Python,
``main(args)`` returns the ``RobustCLI`` (or, for ``evaluate``, the results dict).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as L
import torch
import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lit_robust.batches import module_batch
from lit_robust.checkpoints import check_checkpoint_file
from lit_robust.defenses.base import AdversarialModule

SUMMARY_KEYS = ("test/clean_acc", "test/robust_acc", "test/autoattack_acc", "test/worst_case_acc",
                "test/certified_acc", "test/noisy_acc", "test/acr")


class RobustCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="test the final weights on the test split after fit")

    def after_fit(self) -> None:
        if not self.config[self.subcommand].test_after_fit:
            return
        checkpoint = self.trainer.checkpoint_callback
        selected = checkpoint is not None and checkpoint.monitor is not None and checkpoint.best_model_path
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if selected else None)
        print_summary(self.trainer)

    def after_test(self) -> None:
        print_summary(self.trainer)


def print_summary(trainer: L.Trainer) -> None:
    """One line with the test accuracies, for logs and the README."""
    if not trainer.is_global_zero:
        return
    found = {k: float(v) for k, v in trainer.callback_metrics.items() if k in SUMMARY_KEYS}
    if found:
        print("lit_robust summary: " + "  ".join(f"{k}={v:.4f}" for k, v in sorted(found.items())))


def main(args: Optional[list[str]] = None, run: bool = True) -> Any:
    """Runs the CLI; ``run=False`` only parses ``args`` and instantiates the trainer, model and data.

    Without ``args`` (the console script, ``train.py``) it reads the command line and returns
    None, so the exit status is 0 on success; with ``args`` it returns the ``RobustCLI`` (for
    ``evaluate``: :func:`evaluate_command`'s results).
    """
    argv = sys.argv[1:] if args is None else args
    # Lightning 2.6's own use of a torch API deprecated in torch 2.10+, printed on every run; nothing to act on
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
    if argv[:1] == ["evaluate"]:
        result = evaluate_command(argv[1:])
    else:  # args=None: LightningCLI reads sys.argv itself, without its warning about args given twice
        result = _cli(RobustCLI, args, run)
    return None if args is None else result


def _cli(cls: type[RobustCLI], args: Any, run: bool) -> RobustCLI:
    return cls(AdversarialModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
               args=args, run=run, save_config_kwargs={"overwrite": True})


class _SavedRunCLI(RobustCLI):
    """The model and data of a run's saved config (a dict), for ``evaluate``.

    The config is not a command line, so LightningCLI's warning about ``args`` given beside
    ``sys.argv`` does not apply; and no Trainer is built (a multi-GPU run's Trainer settings
    need not fit the machine that evaluates it).
    """

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        self.config = parser.parse_object(args)

    def instantiate_trainer(self, **kwargs: Any) -> None:
        return None


# Keys a saved config.yaml holds for its subcommand (fit/test), not for instantiating the objects.
_SUBCOMMAND_KEYS = ("ckpt_path", "weights_only", "verbose", "test_after_fit")


def evaluate_command(args: list[str]) -> dict:
    """``lit-robust evaluate``: load a run's model and data from its config, its weights from a checkpoint."""
    from lit_robust.datamodules import CIFAR10CDataModule, CIFAR100CDataModule
    from lit_robust.evaluation import TIERS, evaluate
    from lit_robust.evaluation.export import classifier_state_dict, export_classifier

    parser = argparse.ArgumentParser(prog="lit-robust evaluate", description=evaluate_command.__doc__)
    parser.add_argument("--config", required=True, help="the run's config.yaml (lightning_logs/version_N/)")
    parser.add_argument("--ckpt", required=True, help="a checkpoint of that run")
    parser.add_argument("--out", default="evaluation", help="folder for report.json, report.md and the plots")
    parser.add_argument("--data_dir", help="override the config's data.init_args.data_dir")
    parser.add_argument("--eps", type=float, help="default: the model's training eps")
    parser.add_argument("--norm", choices=("linf", "l2"), help="default: the model's training norm")
    parser.add_argument("--tiers", nargs="+", choices=TIERS, default=list(TIERS))
    parser.add_argument("--n_examples", type=int, help="the first n test examples (default: all, as RobustBench)")
    parser.add_argument("--subset_seed", type=int, help="a seeded random subset of n_examples instead")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=500)
    parser.add_argument("--sanity_examples", type=int, default=500, help="0 skips the sanity checks and eps curve")
    parser.add_argument("--cifar_c", metavar="DIR", help="also measure CIFAR-10-C (CIFAR-100-C for 100 classes)")
    parser.add_argument("--export", metavar="DIR", help="also write the classifier as plain PyTorch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (default: shown on a terminal)")
    opts = parser.parse_args(args)
    if not Path(opts.config).is_file():
        parser.error(f"--config: no such file: {opts.config}")
    try:  # a usage error up front, before the model and data are built
        check_checkpoint_file(opts.ckpt)
    except (OSError, ValueError) as error:
        parser.error(f"--ckpt: {error}")

    with open(opts.config) as f:
        config = {k: v for k, v in yaml.safe_load(f).items() if k not in _SUBCOMMAND_KEYS}
    if opts.data_dir is not None:
        config["data"].setdefault("init_args", {})["data_dir"] = opts.data_dir
    cli = _cli(_SavedRunCLI, config, run=False)
    module, data = cli.model, cli.datamodule
    model = module.model.eval()
    model.load_state_dict(classifier_state_dict(opts.ckpt))
    model.to(opts.device)
    data.prepare_data()
    data.setup("test")
    corruptions = None
    if opts.cifar_c is not None:
        cls = CIFAR100CDataModule if getattr(data, "num_classes", 10) == 100 else CIFAR10CDataModule
        corruptions = cls(opts.cifar_c, batch_size=opts.batch_size)
    results = evaluate(model, data.test_dataloader(), opts.out, eps=opts.eps or module.eps, norm=opts.norm or module.norm,
                       tiers=opts.tiers, n_examples=opts.n_examples, subset_seed=opts.subset_seed, seed=opts.seed,
                       batch_size=opts.batch_size, device=opts.device, sanity_examples=opts.sanity_examples,
                       corruptions=corruptions, progress=False if opts.quiet else None,
                       inputs=module.batch_keys[0], targets=module.batch_keys[1],
                       metadata={"checkpoint": opts.ckpt, "config": opts.config,
                                 "command": "lit-robust evaluate " + " ".join(args)})
    if opts.export is not None:
        example = module_batch(module, next(iter(data.test_dataloader())))[0][:2]
        results["files"].update(export_classifier(model, example, opts.export))
    accuracy = results["robustness"]["accuracy"]
    print("lit_robust evaluation: " + "  ".join(f"{k}={v:.4f}" for k, v in accuracy.items()))
    for check in results["sanity"] or []:
        print(f"  sanity {check['status']}: {check['name']}: {check['message']}")
    for name, path in results["files"].items():
        print(f"  wrote {name}: {path}")
    return results


if __name__ == "__main__":
    main()
