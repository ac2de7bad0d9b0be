"""Griffe extension for the lit_robust docs (loaded by mkdocstrings, see mkdocs.yml).

1. Attaches the remapped packages: ``datamodules/`` and ``callbacks/`` install as ``lit_robust.datamodules``
   and ``lit_robust.callbacks`` (setup.cfg ``package_dir``), which a static scan of ``lit_robust/`` cannot
   see. They are loaded from their folders as submodules of ``lit_robust``.
2. Rewrites the Sphinx roles of the docstrings (``:class:`~a.b.C```, ``:func:``, ``:meth:``, ``:attr:``,
   ``:data:``, ``:mod:``) into mkdocs-autorefs links ``[C][a.b.C]`` when the target is rendered in the
   API reference, and into inline code otherwise (private helpers, torch, names that do not resolve), so
   a link never points nowhere. ``:math:`x``` and ``.. math::`` blocks become code (the site works offline,
   without a math renderer), and reST literal-block markers (``text::``) become a plain colon.
3. Gives a package's name back to what its ``__init__`` imports under it when a submodule of the same name
   shadows it in griffe (``lit_robust.evaluation.autoattack`` is the function, as at run time).
4. Checks the Args sections griffe's own check gets wrong (``eps, steps: ...`` items, base-class arguments
   taken through ``**kwargs``): a documented name that is not a parameter is a warning (a strict failure).
5. Marks a public name without a docstring as such, so it still has its entry in the reference.
"""

from __future__ import annotations

import re
from contextlib import suppress
from pathlib import Path

import griffe

REMAPPED = {"datamodules": "datamodules", "callbacks": "callbacks"}  # lit_robust.<name> -> folder at the root

# The modules the API reference renders (docs/api/*.md); their __all__ names are the link targets.
API_MODULES = ("lit_robust.attacks", "lit_robust.attacks.functional", "lit_robust.defenses",
               "lit_robust.callbacks", "lit_robust.datamodules", "lit_robust.evaluation", "lit_robust.certify",
               "lit_robust.models", "lit_robust.objectives", "lit_robust.optim")

ROLE = re.compile(r":(class|func|meth|attr|data|mod|obj|exc):`(~?)([^`<>]+?)`")
MATH = re.compile(r":math:`([^`]+)`")
MATH_BLOCK = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*\n", re.M)
UNDOCUMENTED = "*No docstring yet: the signature (or the value) above is all there is.*"
PASS_THROUGH = {"...", "others", "kwargs"}  # items that stand for "the other arguments, as the base class"
LITERAL = re.compile(r"(\S)::[ \t]*$", re.M)

logger = griffe.get_logger("griffe_lit_robust")


def _exports(mod: griffe.Module) -> list[str]:
    exports = mod.exports
    if exports is None:  # modules without __all__: their public names
        return [n for n, m in mod.members.items() if not n.startswith("_") and not m.is_alias]
    return [e if isinstance(e, str) else e.name for e in exports]


class LitRobustDocs(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs) -> None:
        if pkg.name != "lit_robust":
            return
        root = Path(pkg.filepath).parent.parent
        for name, folder in REMAPPED.items():
            if name in pkg.members and not pkg.members[name].is_alias:
                continue
            init = root / folder / "__init__.py"
            if not init.is_file():
                continue
            module = loader._load_module(name, init, submodules=True, parent=pkg)  # noqa: SLF001
            pkg.set_member(name, module)
            loader.expand_exports(module)
            loader.expand_wildcards(module, external=False)
        objects = list(self._walk(pkg))  # before _unshadow hides the shadowed submodules from the tree
        self._unshadow(pkg)
        self.targets = self._documented(pkg)
        for obj in objects:
            if obj.docstring is not None:
                obj.docstring.value = self._rewrite(obj.docstring.value, obj)
                self._grouped_args(obj)

    # -- which objects the reference renders ---------------------------------------------------------------------
    def _documented(self, pkg: griffe.Module) -> dict[str, str]:
        """Canonical path -> rendered path, for every object the API pages render."""
        collection = pkg.modules_collection
        targets: dict[str, str] = {}
        self.undocumented: list[str] = []
        for mod_path in API_MODULES:
            try:
                mod = collection.get_member(mod_path)
            except KeyError:
                continue
            targets[mod.path] = mod_path
            for name in _exports(mod):
                if name not in mod.members:
                    continue
                member = mod.members[name]
                try:
                    final = member.final_target if member.is_alias else member
                except (griffe.AliasResolutionError, griffe.CyclicAliasError):
                    continue
                if not final.docstring and not final.is_module:
                    # a public name without a docstring still gets its entry (signature or value), marked
                    final.docstring = griffe.Docstring(UNDOCUMENTED, parent=final)
                    self.undocumented.append(rendered_name := f"{mod_path}.{name}")
                    logger.debug("public name without a docstring: %s", rendered_name)
                rendered = f"{mod_path}.{name}"
                targets.setdefault(final.path, rendered)
                targets.setdefault(rendered, rendered)
                if final.is_class:  # its own documented public members are rendered too (not the inherited ones)
                    for mname, m in final.members.items():
                        if mname.startswith("_"):
                            continue
                        try:
                            mf = m.final_target if m.is_alias else m
                        except (griffe.AliasResolutionError, griffe.CyclicAliasError):
                            continue
                        if mf is not None and mf.docstring:  # rendered only with a docstring
                            targets.setdefault(f"{final.path}.{mname}", f"{rendered}.{mname}")
                            targets.setdefault(f"{rendered}.{mname}", f"{rendered}.{mname}")
        return targets

    def _grouped_args(self, obj: griffe.Object) -> None:
        """Check the Args section of a docstring that griffe's per-name check gets wrong, then parse it.

        The library documents several parameters in one item (``eps, steps, step_size: the training attack``)
        and documents the base class's arguments that a subclass takes through ``**kwargs`` (TRADES's
        ``beta``). Griffe's Google parser warns on both. Here each documented name must be a parameter of the
        signature or, through ``**kwargs``, of a base class's ``__init__``; a name that is neither (it drifted
        away from the code) is a warning, which fails the strict build. Such docstrings are then parsed
        without griffe's own name check (the parsed sections are cached on the docstring).
        """
        match = re.search(r"^(?P<indent>[ \t]*)(?:Args|Arguments|Parameters):[ \t]*\n(?P<body>(?:[ \t]*\n|(?P=indent)[ \t]+.*\n?)*)",
                          obj.docstring.value, re.M)
        if not match:
            return
        body = match.group("body")
        first = re.search(r"^([ \t]+)\S", body, re.M)
        if not first:
            return
        items = re.findall(rf"^{first.group(1)}(\*{{0,2}}[A-Za-z_][^:\n]*?):", body, re.M)
        try:
            params = list(obj.parameters)
        except AttributeError:
            return
        names = {p.name for p in params}
        has_kwargs = any(p.kind is griffe.ParameterKind.var_keyword for p in params)
        grouped = any("," in item or item.strip() in PASS_THROUGH for item in items)
        if not grouped and not has_kwargs:
            return  # griffe's own check applies
        if has_kwargs and obj.is_class:
            for base in obj.mro():
                init = base.members.get("__init__")
                if init is not None:
                    with suppress(Exception):
                        names |= {p.name for p in init.parameters}
        for item in items:
            for name in item.split(","):
                name = re.sub(r"\s+and the rest$", "", name.strip()).lstrip("*")
                if name in names or name in PASS_THROUGH:
                    continue
                logger.warning("%s:%s: documented parameter %r is not a parameter of %s",
                               obj.relative_filepath, obj.docstring.lineno, name, obj.path)
        options = {**(obj.docstring.parser_options or {}), "warn_unknown_params": False, "warn_missing_types": False}
        obj.docstring.__dict__["parsed"] = obj.docstring.parse(**options)

    def _unshadow(self, pkg: griffe.Module) -> None:
        """Give a package's name back to what its ``__init__`` imports under it, as Python does.

        ``lit_robust/evaluation/__init__.py`` does ``from lit_robust.evaluation.autoattack import autoattack``:
        at run time ``lit_robust.evaluation.autoattack`` is the function, but griffe lets the submodule
        ``autoattack.py`` take the name, and the public function disappears from the reference. Here the
        package's member becomes the imported object again. Every alias is resolved first (griffe caches
        the target), so the imports that go through the submodule's path keep working.
        """
        for obj in self._walk_all(pkg):
            if obj.is_alias:
                with suppress(Exception):
                    obj.final_target  # noqa: B018  (resolves and caches)
        for mod in [m for m in self._walk(pkg) if m.is_module]:
            for name, member in list(mod.members.items()):
                imported = mod.imports.get(name)
                if member.is_alias or not member.is_module or not imported or imported == member.path:
                    continue
                if imported.rsplit(".", 1)[0] == member.path and name in member.members:
                    target = member.members[name]
                    mod.set_member(name, griffe.Alias(name, target.final_target if target.is_alias else target,
                                                      parent=mod))

    def _walk_all(self, obj):
        yield obj
        if obj.is_alias:
            return
        for member in obj.members.values():
            yield from self._walk_all(member)

    def _walk(self, obj: griffe.Object):
        yield obj
        for member in obj.members.values():
            if not member.is_alias:
                yield from self._walk(member)

    # -- docstring rewriting -------------------------------------------------------------------------------------
    def _resolve(self, name: str, obj: griffe.Object) -> str | None:
        name = name.lstrip(".")
        if name in self.targets:
            return self.targets[name]
        head, _, rest = name.partition(".")
        scope = obj
        while scope is not None:
            try:
                path = scope.resolve(head)
            except Exception:  # noqa: BLE001  (griffe.NameResolutionError and friends)
                path = None
            if path:
                full = f"{path}.{rest}" if rest else path
                found = self._canonical(full, obj)
                if found:
                    return found
            scope = scope.parent
        return self._canonical(name, obj)

    def _canonical(self, path: str, obj: griffe.Object) -> str | None:
        if path in self.targets:
            return self.targets[path]
        try:
            target = obj.modules_collection.get_member(path)
            final = target.final_target if target.is_alias else target
        except Exception:  # noqa: BLE001
            return None
        return self.targets.get(final.path)

    def _rewrite(self, text: str, obj: griffe.Object) -> str:
        def role(match: re.Match) -> str:
            kind, tilde, target = match.groups()
            target = target.strip()
            title = target.rsplit(".", 1)[-1] if tilde else target
            if kind in ("func", "meth") and not title.endswith(")"):
                title += "()"
            resolved = self._resolve(target.rstrip("()"), obj)
            if resolved is None:
                return f"`{title}`"
            return f"[`{title}`][{resolved}]"

        text = ROLE.sub(role, text)
        text = MATH.sub(lambda m: f"`{m.group(1)}`", text)
        text = MATH_BLOCK.sub("", text)
        return LITERAL.sub(r"\1:", text)
