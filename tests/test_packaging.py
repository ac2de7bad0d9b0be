"""The install layout: ``datamodules/`` and ``callbacks/`` ship as ``lit_robust.datamodules`` and
``lit_robust.callbacks`` (never as top-level packages), every package folder is listed in
setup.cfg, and the ``lit-robust`` console script works.

The wheel is built from a copy of the source tree so that a stale ``build/`` folder can
neither leak old files into the wheel nor be left behind in the repository.
"""

import configparser
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SETUP_CFG = REPO / "setup.cfg"
# Never copied into the build tree: local environments, build outputs, run artefacts.
_SKIP_AT_ROOT = {".git", ".venv", "build", "dist", "lightning_logs", "data", ".pytest_cache"}


def _setup_options() -> tuple[list[str], dict[str, str]]:
    """setup.cfg's ``[options] packages`` and ``package_dir`` (package -> folder)."""
    cfg = configparser.ConfigParser()
    cfg.read(SETUP_CFG)
    packages = [p.strip() for p in cfg["options"]["packages"].splitlines() if p.strip()]
    package_dir = {}
    for line in cfg["options"].get("package_dir", "").splitlines():
        if line.strip():
            name, _, folder = line.partition("=")
            package_dir[name.strip()] = folder.strip().strip("/")
    return packages, package_dir


def _folder_to_package(rel: Path, package_dir: dict[str, str]) -> str:
    """Package name a folder installs as, following ``package_dir`` (longest mapping wins)."""
    rel_posix = rel.as_posix()
    best = None
    for name, folder in package_dir.items():
        if folder and (rel_posix == folder or rel_posix.startswith(folder + "/")):
            if best is None or len(folder) > len(package_dir[best]):
                best = name
    if best is None:
        root = package_dir.get("", "")
        inner = Path(rel_posix).relative_to(root) if root else Path(rel_posix)
        return ".".join(inner.parts)
    rest = Path(rel_posix).relative_to(package_dir[best]).parts
    return ".".join((best, *rest)) if best else ".".join(rest)


def _ignore(src: str, names: list[str]) -> set[str]:
    skip = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
    if Path(src).resolve() == REPO:
        skip |= _SKIP_AT_ROOT.intersection(names)
    return skip


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=_ignore, symlinks=True)
    dist = tmp / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir",
         "-q", "-w", str(dist), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = list(dist.glob("lit_robust-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for expected in ("lit_robust/__init__.py", "lit_robust/datamodules/__init__.py",
                     "lit_robust/datamodules/digits.py", "lit_robust/callbacks/__init__.py"):
        assert expected in names, expected
    tops = {n.split("/", 1)[0] for n in names}
    assert "datamodules" not in tops and "callbacks" not in tops, sorted(tops)
    assert {t for t in tops if not t.endswith(".dist-info")} == {"lit_robust"}, sorted(tops)
    assert not any(n.startswith("tests/") or "/tests/" in n for n in names)


def test_installed_wheel_imports_outside_source_tree(wheel, tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", str(site), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    check = textwrap.dedent(f"""
        import importlib, sys
        from pathlib import Path
        site = Path({str(site)!r}).resolve()
        import lit_robust, lit_robust.datamodules, lit_robust.callbacks
        from lit_robust.datamodules import DigitsDataModule
        assert lit_robust.datamodules.DigitsDataModule is DigitsDataModule
        assert DigitsDataModule.__module__ == "lit_robust.datamodules.digits", DigitsDataModule.__module__
        for mod in (lit_robust, lit_robust.datamodules, lit_robust.callbacks, sys.modules[DigitsDataModule.__module__]):
            assert Path(mod.__file__).resolve().is_relative_to(site), (mod.__name__, mod.__file__)
        for top in ("datamodules", "callbacks"):
            try:
                importlib.import_module(top)
            except ImportError:
                pass
            else:
                raise AssertionError(f"top-level package {{top!r}} is importable: {{sys.modules[top].__file__}}")
        print("OK")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = str(site)
    proc = subprocess.run([sys.executable, "-c", check], cwd=run_dir, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


def test_every_package_folder_is_listed_in_setup_cfg():
    packages, package_dir = _setup_options()
    assert len(packages) == len(set(packages)), packages
    roots = {"lit_robust", "datamodules", "callbacks"}
    roots |= {p.split(".")[0] for p in packages} | {d.split("/")[0] for d in package_dir.values() if d}
    on_disk = {}
    for root in sorted(roots):
        for init in (REPO / root).rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            rel = init.parent.relative_to(REPO)
            on_disk[_folder_to_package(rel, package_dir)] = rel.as_posix()
    assert on_disk.get("lit_robust.datamodules") == "datamodules"  # the mapping itself is understood
    assert on_disk.get("lit_robust.callbacks") == "callbacks"
    missing = sorted(set(on_disk) - set(packages))
    assert not missing, f"package folders not in setup.cfg [options] packages: {[(p, on_disk[p]) for p in missing]}"
    stale = sorted(set(packages) - set(on_disk))
    assert not stale, f"setup.cfg lists packages with no folder holding __init__.py: {stale}"


def test_folder_to_package_mapping():
    mapping = {"lit_robust.datamodules": "datamodules", "lit_robust.callbacks": "callbacks"}
    assert _folder_to_package(Path("datamodules/x"), mapping) == "lit_robust.datamodules.x"
    assert _folder_to_package(Path("callbacks"), mapping) == "lit_robust.callbacks"
    assert _folder_to_package(Path("lit_robust/models"), mapping) == "lit_robust.models"
    assert _folder_to_package(Path("datamodules_extra"), mapping) == "datamodules_extra"


def test_console_script_resolves():
    cfg = configparser.ConfigParser()
    cfg.read(SETUP_CFG)
    scripts = [line.strip() for line in cfg["options.entry_points"]["console_scripts"].splitlines() if line.strip()]
    assert "lit-robust = lit_robust.cli:main" in scripts, scripts
    exe = Path(sys.executable).parent / "lit-robust"
    assert exe.is_file(), f"{exe} missing: is lit_robust installed in this environment?"
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fit" in proc.stdout, proc.stdout
