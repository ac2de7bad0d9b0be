"""The command line the README uses: config parsing, fit + test_after_fit, test from a checkpoint."""

import subprocess
import sys
from pathlib import Path

import pytest

from lit_robust.cli import main
from lit_robust.defenses import PGDAT

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--trainer.max_steps=3", "--trainer.limit_val_batches=1", "--model.init_args.test_autoattack=false",
        "--model.init_args.model.init_args.width=4", "--model.init_args.steps=2"]


def _summary(text):
    line = next(l for l in text.splitlines() if l.startswith("lit_robust summary:"))
    return dict(item.split("=") for item in line.split(":", 1)[1].split())


def test_quickstart_config_fit_then_test_from_checkpoint(tmp_path, capsys):
    cli = main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), f"--trainer.default_root_dir={tmp_path}", *FAST])
    assert isinstance(cli.model, PGDAT)
    assert cli.model.eps == pytest.approx(0.2) and cli.model.attack.steps == 2
    assert cli.trainer.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(0.05)
    after_fit = _summary(capsys.readouterr().out)
    assert set(after_fit) == {"test/clean_acc", "test/robust_acc"}

    log_dir = Path(cli.trainer.log_dir)
    ckpt = next((log_dir / "checkpoints").glob("*.ckpt"))
    main(["test", "--config", str(log_dir / "config.yaml"), f"--ckpt_path={ckpt}"])
    from_ckpt = _summary(capsys.readouterr().out)
    # clean accuracy is deterministic: the checkpoint holds exactly the weights tested after fit
    assert from_ckpt["test/clean_acc"] == after_fit["test/clean_acc"]


def test_train_py_uses_the_same_cli():
    out = subprocess.run([sys.executable, "train.py", "fit", "--config", "configs/quickstart.yaml", "--print_config"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "class_path: lit_robust.defenses.PGDAT" in out.stdout
    assert "class_path: lit_robust.datamodules.DigitsDataModule" in out.stdout
    assert "test_after_fit: true" in out.stdout
