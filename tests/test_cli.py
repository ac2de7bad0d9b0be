"""The command line the README uses: config parsing, fit + test_after_fit, test from a checkpoint, evaluate,
and the console script's exit status and output."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lit_robust.cli import main
from lit_robust.evaluation import load_exported
from lit_robust.defenses import PGDAT

ROOT = Path(__file__).resolve().parents[1]
CONSOLE = str(Path(sys.executable).with_name("lit-robust"))  # the installed console script
ARGS_WARNING = "args parameter is intended to run from within Python"
FAST = ["--trainer.max_steps=3", "--trainer.limit_val_batches=1", "--model.init_args.test_autoattack=false",
        "--model.init_args.model.init_args.width=4", "--model.init_args.steps=2"]


class Terminal(io.StringIO):
    """A stderr that says it is a terminal: where progress bars show unless --quiet."""

    def isatty(self) -> bool:
        return True


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


def test_evaluate_command_reports_and_exports_a_trained_checkpoint(tmp_path, capsys, monkeypatch):
    """``lit-robust evaluate``: the run's config and checkpoint in, report files and a plain-PyTorch model out;
    the model is evaluated in eval mode, and --quiet shows no progress bars."""
    cli = main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), f"--trainer.default_root_dir={tmp_path}", *FAST])
    log_dir = Path(cli.trainer.log_dir)
    ckpt = next((log_dir / "checkpoints").glob("*.ckpt"))
    capsys.readouterr()
    terminal = Terminal()  # where progress bars would show, but for --quiet
    monkeypatch.setattr(sys, "stderr", terminal)
    results = main(["evaluate", "--config", str(log_dir / "config.yaml"), "--ckpt", str(ckpt), "--out",
                    str(tmp_path / "report"), "--tiers", "pgd", "apgd", "--n_examples", "48", "--sanity_examples", "24",
                    "--export", str(tmp_path / "export"), "--quiet"])
    assert "robustness" not in terminal.getvalue() and "sanity" not in terminal.getvalue()
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    accuracy = report["robustness"]["accuracy"]
    assert report["robustness"]["eps"] == pytest.approx(0.2) and report["robustness"]["n_examples"] == 48
    assert set(accuracy) == {"clean", "pgd", "apgd-ce", "apgd-t", "worst_case"}
    assert accuracy["worst_case"] <= min(accuracy["pgd"], accuracy["apgd-ce"], accuracy["apgd-t"]) <= accuracy["clean"]
    assert {c["name"] for c in report["sanity"]} >= {"deterministic_eval", "iterative_beats_single_step"}
    assert report["sanity"][0]["name"] == "deterministic_eval" and report["sanity"][0]["status"] == "pass"
    assert (tmp_path / "report" / "robust_accuracy_vs_eps.png").stat().st_size > 0
    assert "lit_robust evaluation: clean=" in capsys.readouterr().out
    # the exported classifier reproduces the checkpoint's test accuracy
    x, y = cli.datamodule.splits["test"].tensors
    exported = load_exported(results["files"]["program"])
    assert (exported(x[:48]).argmax(1) == y[:48]).float().mean().item() == pytest.approx(accuracy["clean"])


def test_console_script_exits_0_on_success_without_noise_and_non_zero_on_failure(tmp_path):
    def console(*args):
        done = subprocess.run([CONSOLE, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert ARGS_WARNING not in done.stderr and "RobustCLI object" not in done.stderr
        return done

    fit = console("fit", "--config", str(ROOT / "configs/quickstart.yaml"), f"--trainer.default_root_dir={tmp_path}",
                  "--test_after_fit=false", *FAST)
    assert fit.returncode == 0, fit.stderr
    run = tmp_path / "lightning_logs/version_0"
    ckpt = str(next((run / "checkpoints").glob("*.ckpt")))
    common = ["--config", str(run / "config.yaml"), "--out", str(tmp_path / "report"), "--tiers", "pgd",
              "--n_examples", "16", "--sanity_examples", "0"]
    evaluated = console("evaluate", "--ckpt", ckpt, *common)
    assert evaluated.returncode == 0, evaluated.stderr
    assert evaluated.stdout.startswith("lit_robust evaluation: clean=")
    assert "'robustness'" not in evaluated.stderr and "robustness:" not in evaluated.stderr  # no dict, no bar
    missing = console("evaluate", "--ckpt", str(tmp_path / "missing.ckpt"), *common)
    assert missing.returncode != 0 and f"--ckpt: checkpoint {tmp_path / 'missing.ckpt'} is missing" in missing.stderr
