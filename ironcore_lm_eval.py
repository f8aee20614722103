"""Lets the ``lm_eval`` command find IronCore's model (``--model ironcore``); run at interpreter start.

lm-evaluation-harness knows its models from a table in ``lm_eval.models`` and
has no plug-in entry points, so the ironcore distribution installs
``ironcore-lm-eval.pth`` (see ``setup.py``), which imports this module, a
top-level one so that starting Python imports nothing of ``ironcore`` (nor
lm-eval, nor torch): it only watches for ``lm_eval.models``. When lm-eval
loads that module (its first model lookup), the ``ironcore`` name is added to
lm-eval's registry as a lazy reference to
:class:`ironcore.evaluation.harness.IronCoreLM`.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

WATCHED = "lm_eval.models"
MODEL = "ironcore.evaluation.harness:IronCoreLM"


def register() -> None:
    """Add ``ironcore`` to lm-eval's model registry (lazily: the adapter is imported when it is asked for)."""
    from lm_eval.api.registry import model_registry

    if "ironcore" not in model_registry:
        model_registry.register("ironcore", target=MODEL)


class _Watcher(importlib.abc.MetaPathFinder):
    """Finds ``lm_eval.models`` through the other finders, and registers IronCore once it has run."""

    def find_spec(self, name: str, path: object, target: types.ModuleType | None = None
                  ) -> importlib.machinery.ModuleSpec | None:  # fmt: skip
        if name != WATCHED:
            return None
        sys.meta_path.remove(self)  # one import to watch: the others find the module
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            run = spec.loader.exec_module

            def exec_module(module: types.ModuleType) -> None:
                run(module)
                register()

            spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Register now if lm-eval's models are loaded already, else when they are."""
    if WATCHED in sys.modules:
        register()
    elif not any(isinstance(finder, _Watcher) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Watcher())


install()
