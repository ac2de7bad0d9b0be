"""The documentation site (mkdocs.yml, docs/): it builds without a warning, covers every public name and
every registered defense, and the code of its pages runs.

- ``mkdocs build --strict`` into a temporary folder: a broken cross-reference, a missing page, a link to
  nowhere or a docstring parameter that is not in the signature is a warning, and a warning fails.
- The API reference (the built site's ``objects.inv``) holds every name of every ``__all__`` of the
  public packages.
- Every defense of ``DEFENSES`` and ``CERTIFIED_DEFENSES`` has its page and a row in the table of
  "Choosing a defense".
- The ```` ```python ```` blocks of every page run, page by page in a fresh process (in order, sharing one
  namespace, like a notebook), on the digits, one thread. A block not meant to run is preceded by
  ``<!-- no-run: why -->`` (a CIFAR-10 download, several GPUs, files the reader has and we do not).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PUBLIC_MODULES = ("lit_robust", "lit_robust.attacks", "lit_robust.defenses", "lit_robust.callbacks",
                  "lit_robust.datamodules", "lit_robust.evaluation", "lit_robust.certify", "lit_robust.models",
                  "lit_robust.objectives", "lit_robust.optim")
BLOCK = re.compile(r"^(?P<marker><!--\s*no-run(?P<why>[^>]*)-->[ \t]*\n)?```python[^\n]*\n(?P<code>.*?)^```",
                   re.S | re.M)
BUILD_SECONDS = 120  # measured about 10-20 s on a shared 2-core CPU
BLOCK_SECONDS = 60   # each block is meant to take well under 20 s on one thread; this only catches a runaway

# Not a skip: CI must build the site. scripts/env.sh installs the docs extra with the test one.
MISSING_TOOLS = [name for name in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python", "griffe")
                 if importlib.util.find_spec(name.split(".")[0]) is None
                 or (name == "mkdocstrings_handlers.python" and importlib.util.find_spec(name) is None)]
TOOLS_MESSAGE = f"the docs tools are not installed ({MISSING_TOOLS}): pip install -e '.[docs]'"


def _pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "_ext" not in p.parts)


def _blocks(page: Path) -> list[tuple[str, str | None]]:
    """(code, why it does not run or None) of each python block of a page."""
    return [(m.group("code"), m.group("why").strip(" :") if m.group("marker") else None)
            for m in BLOCK.finditer(page.read_text())]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    assert not MISSING_TOOLS, TOOLS_MESSAGE
    out = tmp_path_factory.mktemp("site")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    elapsed = time.monotonic() - start
    problems = [line for line in proc.stderr.splitlines() if not line.startswith("INFO") and line.strip()]
    assert proc.returncode == 0, "mkdocs build --strict failed:\n" + "\n".join(problems)[-6000:]
    assert elapsed < BUILD_SECONDS, f"the docs build took {elapsed:.0f} s"
    return out


def _inventory(site: Path) -> set[str]:
    """The identifiers in the built site's objects.inv (Sphinx inventory v2)."""
    raw = (site / "objects.inv").read_bytes()
    lines = raw.split(b"\n", 4)
    assert lines[0].startswith(b"# Sphinx inventory version 2"), lines[0]
    body = zlib.decompress(lines[4]).decode()
    return {line.split(" ", 1)[0] for line in body.splitlines() if line.strip()}


def _registries() -> list[str]:
    from lit_robust.defenses import CERTIFIED_DEFENSES, DEFENSES
    return [*DEFENSES, *CERTIFIED_DEFENSES]


def test_mkdocs_build_strict(site):
    assert (site / "index.html").is_file()
    assert (site / "api" / "defenses" / "index.html").is_file()


def test_every_public_name_is_in_the_api_reference(site):
    inventory = _inventory(site)
    expected = []
    for name in PUBLIC_MODULES:
        module = importlib.import_module(name)
        exported = getattr(module, "__all__", None)
        if exported is None:
            continue  # the top-level package exports nothing itself
        expected += [f"{name}.{member}" for member in exported]
    missing = [path for path in expected if path not in inventory]
    assert not missing, f"public names missing from the API reference (docs/api/): {missing}"
    assert len(expected) > 150


def test_every_rendered_public_name_has_a_docstring(site):
    """The griffe extension marks a public name without a docstring (``UNDOCUMENTED`` in
    docs/_ext/griffe_lit_robust.py); none may be left on any page."""
    marker = "No docstring yet"
    assert marker in (DOCS / "_ext" / "griffe_lit_robust.py").read_text()  # still the extension's words
    pages = [str(page.relative_to(site)) for page in site.rglob("*.html") if marker in page.read_text()]
    assert not pages, f"public names without a docstring on {pages}"


def test_every_defense_has_a_page_and_a_row_in_the_choosing_table(site):
    table = (DOCS / "choosing-a-defense.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    first_cells = [row.split(" | ", 1)[0] for row in rows]
    for name in _registries():
        page = site / "api" / "defenses" / name / "index.html"
        assert page.is_file(), f"no page for the defense {name}"
        assert f'id="lit_robust.defenses.{name}"' in page.read_text(), f"{name}'s page does not render its class"
        assert any(re.search(rf"`{name}[`(]", cell) for cell in first_cells), (
            f"{name} has no row in the table of docs/choosing-a-defense.md")


def test_no_run_blocks_say_why():
    for page in _pages():
        for code, why in _blocks(page):
            assert why is None or len(why) > 10, f"{page}: a no-run block without its reason: {code[:80]}"


RUNNABLE = [p for p in _pages() if any(why is None for _, why in _blocks(p))]


@pytest.mark.parametrize("page", RUNNABLE, ids=[str(p.relative_to(DOCS)) for p in RUNNABLE])
def test_page_code_runs(page, tmp_path):
    blocks = [code for code, why in _blocks(page) if why is None]
    script = ["import time as _t", "_times = []"]
    for i, code in enumerate(blocks):
        script += ["_s = _t.monotonic()", code, f"_times.append(({i}, _t.monotonic() - _s))"]
    script.append("print('DOCS-BLOCK-TIMES', _times)")
    (tmp_path / "page.py").write_text("\n".join(script))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "page.py"], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=60 + BLOCK_SECONDS * len(blocks))
    assert proc.returncode == 0, f"{page.relative_to(ROOT)}: a code block failed:\n{proc.stderr[-4000:]}"
    times = eval(proc.stdout.rsplit("DOCS-BLOCK-TIMES", 1)[1].strip())  # noqa: S307 (our own output)
    print(page.relative_to(DOCS), [f"{t:.1f} s" for _, t in times])
    slow = [(i, t) for i, t in times if t > BLOCK_SECONDS]
    assert not slow, f"{page.relative_to(ROOT)}: blocks over {BLOCK_SECONDS} s: {slow}"


def test_readme_keeps_the_commands_the_summary_and_the_sites_tour():
    readme = (ROOT / "README.md").read_text()
    assert readme.startswith("# lit_robust\n\n```bash\nbash scripts/quickstart.sh")
    assert "bash scripts/test.sh" in readme.split("```", 3)[1]
    assert "lit_robust summary: test/autoattack_acc=" in readme
    # the README's tour is docs/index.md's, which test_page_code_runs runs
    site_blocks = [code for code, why in _blocks(DOCS / "index.md") if why is None]
    readme_blocks = [m.group("code") for m in BLOCK.finditer(readme)]
    assert readme_blocks and all(code in site_blocks for code in readme_blocks)


def test_links_and_configs_in_the_readme_and_the_defense_table_exist():
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"
    for text in (readme, (DOCS / "choosing-a-defense.md").read_text()):
        for config in re.findall(r"`((?:cifar10/)?[\w-]+\.yaml)`", text):
            assert (ROOT / "configs" / config).is_file(), f"configs/{config} is named in a defense table but missing"


def test_a_documented_parameter_that_left_the_signature_fails_the_build(tmp_path, caplog):
    """The docs extension checks the library's grouped Args items (``a, b: ...``) itself; a name that is not
    a parameter any more is a warning, which fails ``mkdocs build --strict``."""
    import logging

    assert not MISSING_TOOLS, TOOLS_MESSAGE
    import griffe

    package = tmp_path / "lit_robust"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "thing.py").write_text(
        'class Thing:\n    """A thing.\n\n    Args:\n        eps, steps: the attack.\n        gone, eps_l2: radii.\n    """\n\n'
        "    def __init__(self, eps, steps, eps_l2):\n        pass\n")
    extensions = griffe.load_extensions(f"{DOCS / '_ext' / 'griffe_lit_robust.py'}:LitRobustDocs")
    with caplog.at_level(logging.WARNING):
        griffe.load("lit_robust", search_paths=[str(tmp_path)], extensions=extensions, try_relative_path=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("'gone'" in w for w in warnings), warnings
    assert not any("'eps'" in w or "'steps'" in w or "'eps_l2'" in w for w in warnings), warnings
