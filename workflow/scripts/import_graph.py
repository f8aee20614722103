"""Which ``ironcore`` modules a file imports, and which files importing some entry points runs.

One walker for the two places that must not miss an import: the layer test (``tests/test_layout.py``) and
the pipeline's code fingerprints (``code_fingerprint.py``). It reads the source with :mod:`ast` and never
imports the package (so no torch). An import counts wherever it is written, also inside a function, and so
does a module that code names in a string for ``importlib.import_module``: ``"ironcore.rewards.model:fn"``
(a ``module:attribute`` plug-in) names that module, ``f"ironcore.kernels.{name}"`` every module of the
package.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


@dataclass(frozen=True)
class Import:
    module: str  # a module or package of the package, dotted ("ironcore.config.model")
    on_load: bool  # runs when the importing module loads (False: inside a function, runs when that is called)


class Package:
    """The modules of one package folder (``ironcore/``, or a copy of it) and the imports between them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.modules = {self.module_name(path): path for path in sorted(root.glob("**/*.py"))}

    def module_name(self, path: Path) -> str:
        """``ironcore/config/model.py`` -> ``ironcore.config.model``; a package is named by its ``__init__.py``."""
        parts = path.relative_to(self.root.parent).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    def imports(self, path: Path) -> list[Import]:
        """Every module of the package that ``path`` (a module of it or a script beside it) imports or names."""
        own = self.module_name(path) if path.is_relative_to(self.root) else None
        stat = path.stat()
        found = []
        for reference, on_load in _references(path, (stat.st_mtime_ns, stat.st_size)):
            found += [Import(name, on_load) for name in self._resolve(reference, own, path)]
        return found

    def _resolve(self, reference: tuple, own: str | None, path: Path) -> list[str]:
        """The modules of the package that one reference (see :func:`_references`) names."""
        kind, *args = reference
        if kind in ("import", "string"):
            return [args[0]] if args[0] in self.modules else []
        if kind == "prefix":
            return [name for name in self.modules if name.startswith(args[0])] if args[0][:-1] in self.modules else []
        level, module, names = args
        base = _absolute(level, module, own, path)
        if base not in self.modules:
            return []
        return [f"{base}.{name}" if f"{base}.{name}" in self.modules else base for name in names]

    def closure(self, entries: Iterable[str | Path]) -> list[Path]:
        """The files of the package that importing ``entries`` (module names, or paths of scripts) may run.

        A module imported by name may run any of its code, so every import in it counts. A package that is
        only the parent of a module imported (``ironcore.cli`` of ``ironcore.cli.train``) runs its top level
        on the way: its file is covered, and what that top level imports, not what its functions import
        (``ironcore.cli.main`` imports every command to register its parser, which changes no result).
        """
        named: dict[str, bool] = {}  # module reached -> imported by name (else only as a parent package)
        todo: list[tuple[str | Path, bool]] = [(entry, True) for entry in entries]
        while todo:
            entry, by_name = todo.pop()
            if isinstance(entry, Path):  # a script: not part of the package, its imports are
                todo += [(i.module, True) for i in self.imports(entry)]
                continue
            if entry in named and (named[entry] or not by_name):
                continue
            named[entry] = by_name
            parts = entry.split(".")
            todo += [(".".join(parts[:n]), False) for n in range(1, len(parts))]
            todo += [(i.module, True) for i in self.imports(self.modules[entry]) if by_name or i.on_load]
        return sorted(self.modules[name] for name in named)


@functools.cache
def _references(path: Path, stamp: tuple[int, int]) -> tuple[tuple[tuple, bool], ...]:
    """What ``path`` imports or names, as written, each with whether it runs on load; parsed once per version
    of the file (``stamp``: its mtime and size), as every stage's closure reads the same files.

    ``("import", name)``, ``("from", level, module, names)``, ``("string", name)`` (a string that is a dotted
    name, or one with ``:attribute``), ``("prefix", "a.b.")`` (an f-string starting with a package's name).
    """
    found: list[tuple[tuple, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend((("import", alias.name), not in_function) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names = tuple(alias.name for alias in node.names)
            found.append((("from", node.level, node.module, names), not in_function))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = re.fullmatch(r"(\w+(?:\.\w+)+)(?::\w+)?", node.value)  # a.b or a.b:c, not a word
            if match:
                found.append((("string", match[1]), not in_function))
        elif isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
            prefix = str(node.values[0].value)
            if re.fullmatch(r"(\w+\.)+", prefix):
                found.append((("prefix", prefix), not in_function))
        for child in ast.iter_child_nodes(node):
            visit(child, in_function or isinstance(child, _FUNCTIONS))

    visit(ast.parse(path.read_text(), str(path)), False)
    return tuple(found)


def _absolute(level: int, module: str | None, own: str | None, path: Path) -> str:
    """The dotted module a ``from ... import`` reads, a relative one resolved against ``own`` (the importer)."""
    if not level:
        return module or ""
    if own is None:
        raise ValueError(f"{path}: a relative import outside the package")
    package = own.split(".") if path.name == "__init__.py" else own.split(".")[:-1]
    return ".".join(package[: len(package) - level + 1] + ([module] if module else []))
