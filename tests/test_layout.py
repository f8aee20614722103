"""The package layout keeps its promises: imports run one way, the loop knows no objective, docs stay short.

Layers, top to bottom (a module may import its own package and the layers below it)::

    cli -> training, evaluation -> objectives -> rewards -> inference -> checkpoints -> models -> layers
        -> kernels -> parallel -> data -> config -> files (reading and writing files with one-line errors) -> errors

Every import counts, also those inside functions.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ironcore"
ORDER = [
    ["errors", "ironcore"],  # "ironcore": the package itself (__version__)
    ["files"],
    ["config"],
    ["data"],
    ["parallel"],
    ["kernels"],
    ["layers"],
    ["models"],
    ["checkpoints"],
    ["inference"],
    ["rewards"],
    ["objectives"],
    ["evaluation"],
    ["training"],  # evaluates tasks during training (operation.eval_tasks)
    ["cli"],
    ["__main__"],
]
RANK = {name: rank for rank, names in enumerate(ORDER) for name in names}
# The one import against the order: a training config may name an HF folder as its model, so the
# config loader reads config.json through the HF family records (which import the config classes).
# And a data config's tokenizer may be the one saved with a run's checkpoint (tokenizer.path: a run folder or
# its `latest` pointer), found as init.init_from finds it.
EXCEPTIONS = {("config/loader.py", "ironcore.checkpoints.hf_families"), ("data/tokenizer.py", "ironcore.checkpoints")}


def _component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "ironcore"


def _imports(path: Path) -> list[str]:
    """Every ironcore module ``path`` imports, at any depth of the code."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.split(".")[0] == "ironcore"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ironcore":
            if node.module == "ironcore":  # from ironcore import errors / __version__
                found += [f"ironcore.{alias.name}" if (PACKAGE / alias.name).exists() or
                          (PACKAGE / f"{alias.name}.py").exists() else "ironcore" for alias in node.names]
            else:
                found.append(node.module)
    return found


def test_every_top_level_name_has_a_layer() -> None:
    names = {p.stem if p.suffix == ".py" else p.name for p in PACKAGE.iterdir() if p.name != "__pycache__"}
    assert names - {"__init__"} <= set(RANK), f"add {sorted(names - set(RANK) - {'__init__'})} to ORDER"


def test_imports_run_one_way() -> None:
    wrong = []
    for path in sorted(PACKAGE.glob("**/*.py")):
        relative = path.relative_to(PACKAGE)
        own = relative.parts[0].removesuffix(".py") if len(relative.parts) > 1 or relative.stem != "__init__" \
            else "ironcore"
        for module in _imports(path):
            target = _component(module)
            if target == own or (str(relative), module) in EXCEPTIONS:
                continue
            if RANK[target] >= RANK[own]:
                wrong.append(f"{relative} imports {module}")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_the_training_loop_names_no_objective_and_no_task_type() -> None:
    loop = (PACKAGE / "training" / "trainer.py").read_text()
    assert not re.search(r"dpo|task_type", loop, re.IGNORECASE)
    for name, cls in (("lm", "LMObjective"), ("dpo", "DPOObjective")):
        assert f"class {cls}(Objective)" in (PACKAGE / "objectives" / f"{name}.py").read_text()


def test_readme_is_short_and_the_design_is_in_the_repository() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
    assert (ROOT / "docs" / "design.md").is_file()


def test_nothing_points_outside_the_repository() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode:
        pytest.skip("not a git checkout: no list of the repository's files")
    outside = "../" + "shared"  # spelled in two pieces so that this file does not match itself
    hits = []
    for name in tracked.stdout.split():
        path = ROOT / name
        if path.suffix in (".py", ".md", ".yaml", ".yml", ".smk", ".toml", ".txt", ".sh", "") and path.is_file():
            if outside in path.read_text(errors="ignore"):
                hits.append(name)
    assert not hits, hits
