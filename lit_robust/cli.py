"""Command line: ``lit-robust fit --config configs/quickstart.yaml`` (``python train.py`` is the same).

A ``LightningCLI`` over every ``AdversarialModule`` and every ``LightningDataModule``
(choose them by ``class_path`` in the config), plus one option of ours: ``--test_after_fit``
runs ``trainer.test`` right after ``fit`` and prints a summary line. It tests the best
checkpoint when a ``ModelCheckpoint`` monitors a validation metric (selection on the
held-out validation split, as Rice et al. recommend), else the final weights.
"""

from __future__ import annotations

from typing import Optional

import lightning.pytorch as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lit_robust.defenses.base import AdversarialModule

SUMMARY_KEYS = ("test/clean_acc", "test/robust_acc", "test/autoattack_acc", "test/worst_case_acc")


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


def main(args: Optional[list[str]] = None, run: bool = True) -> RobustCLI:
    """Runs the CLI; ``run=False`` only parses ``args`` and instantiates the trainer, model and data."""
    return RobustCLI(
        AdversarialModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
