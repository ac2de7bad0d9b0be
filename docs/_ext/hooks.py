"""MkDocs hook: one API page per registered defense, generated from the registries at build time.

Every name in ``lit_robust.defenses.DEFENSES`` and ``CERTIFIED_DEFENSES`` gets ``api/defenses/<Name>.md``
rendering its class docstring (the method card), and the nav's "Defenses" section lists them, so a
defense registered tomorrow has its page without anyone writing one. ``api/defenses/index.md`` (the
shared base classes and the list of defenses) is generated too.
"""

from __future__ import annotations

import re

import lit_robust.defenses as defenses
from mkdocs.structure.files import File

SECTION = "Defenses"  # the nav entry under "API reference" that receives the generated pages
OPTIONS = """    options:
      show_root_heading: true
      show_root_full_path: false
      heading_level: 1
      members_order: source
      filters: ["!^_", "!^training_step$", "!^validation_step$", "!^test_step$", "!^configure_optimizers$"]
      inherited_members: false
"""


def _registry() -> list[tuple[str, str]]:
    return ([(name, "DEFENSES") for name in defenses.DEFENSES]
            + [(name, "CERTIFIED_DEFENSES") for name in defenses.CERTIFIED_DEFENSES])


def _summary(cls) -> str:
    """The first paragraph of the class docstring, its reST roles as inline code (``:class:`~a.B``` -> `B`)."""
    doc = (cls.__doc__ or "").strip().split("\n\n", 1)[0]
    doc = re.sub(r":[a-z]+:`(~?)([^`]+)`", lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", doc)
    doc = re.split(r";? [Oo]fficial code", " ".join(doc.split()), maxsplit=1)[0]  # the paper; its page has the rest
    return doc.replace("|", " or ")  # a pipe would split the table's cell


def _defense_page(name: str, registry: str) -> str:
    return (f"---\ntitle: {name}\n---\n\n"
            f"::: lit_robust.defenses.{name}\n{OPTIONS}\n"
            f"Registered in `lit_robust.defenses.{registry}`. Shared constructor arguments, optimizer wiring, "
            f"metrics and checks: [`AdversarialModule`][lit_robust.defenses.AdversarialModule]. "
            f"Compare the defenses: [choosing a defense](../../choosing-a-defense.md).\n")


def _index_page() -> str:
    registered = {n for n, _ in _registry()}
    shared = [n for n in defenses.__all__ if n not in registered and n not in ("DEFENSES", "CERTIFIED_DEFENSES")]
    rows = "\n".join(f"| [`{n}`]({n}.md) | `{reg}` | {_summary(getattr(defenses, n))} |" for n, reg in _registry())
    members = "\n".join(f"        - {n}" for n in ["DEFENSES", "CERTIFIED_DEFENSES", *shared])
    return f"""# lit_robust.defenses

One `LightningModule` per defense, each built on [`AdversarialModule`][lit_robust.defenses.AdversarialModule].
Every defense has its own page with its method card: paper, official code, algorithm, defaults, cost in
forward+backward passes, reported numbers and the deviations we chose. The table below is generated from the
registries; [choosing a defense](../../choosing-a-defense.md) compares their cost and numbers.

| defense | registry | paper |
|---|---|---|
{rows}

## Shared classes and registries

::: lit_robust.defenses
    options:
      show_root_heading: false
      show_root_toc_entry: false
      heading_level: 3
      members:
{members}
"""


def on_config(config, **kwargs):
    for section in config["nav"]:
        if isinstance(section, dict) and "API reference" in section:
            for entry in section["API reference"]:
                if isinstance(entry, dict) and SECTION in entry:
                    entry[SECTION] = ["api/defenses/index.md"] + [
                        {name: f"api/defenses/{name}.md"} for name, _ in _registry()]
                    return config
    raise ValueError(f"mkdocs.yml nav has no 'API reference' > '{SECTION}' entry for the generated defense pages")


def on_files(files, config, **kwargs):
    files.append(File.generated(config, "api/defenses/index.md", content=_index_page()))
    for name, registry in _registry():
        files.append(File.generated(config, f"api/defenses/{name}.md", content=_defense_page(name, registry)))
    return files
