"""Every recipe in configs/ instantiates: class paths resolve, arguments exist and pass validation."""

from pathlib import Path

import pytest
import yaml

from lit_robust.cli import main
from lit_robust.defenses import AdversarialModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(ROOT.glob("configs/**/*.yaml"))


def test_there_are_recipes():
    assert {"quickstart.yaml", "pgd_at.yaml", "pgd_at_awp.yaml"} <= {c.name for c in CONFIGS}


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(ROOT / "configs")) for c in CONFIGS])
def test_config_instantiates_with_its_values(config, tmp_path):
    cli = main(["--config", str(config), f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert isinstance(cli.model, AdversarialModule)
    spec = yaml.safe_load(config.read_text())
    assert type(cli.model).__name__ == spec["model"]["class_path"].rsplit(".", 1)[1]
    assert type(cli.model.model).__name__ == spec["model"]["init_args"]["model"]["class_path"].rsplit(".", 1)[1]
    for key in ("eps", "steps", "step_size", "awp_gamma", "beta"):
        if key in spec["model"]["init_args"]:
            assert getattr(cli.model, key, cli.model.hparams.get(key)) == pytest.approx(spec["model"]["init_args"][key])
    assert cli.trainer.max_epochs == spec["trainer"]["max_epochs"]
