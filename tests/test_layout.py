"""The package layout keeps its promises: imports run one way, the loop knows no objective, docs stay short.

Layers, top to bottom (a module may import its own package and the layers below it)::

    cli -> training, evaluation -> objectives -> rewards -> inference -> checkpoints -> models -> layers
        -> kernels -> parallel -> data -> config -> files (reading and writing files with one-line errors), tables -> errors

Every import counts, also those inside functions, and so does a module named in a string for
``importlib.import_module`` (``workflow/scripts/import_graph.py`` reads them).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow" / "scripts"))

from import_graph import Package  # noqa: E402 (the walker the pipeline's code fingerprints use)

PACKAGE = ROOT / "ironcore"
ORDER = [
    ["errors", "ironcore"],  # "ironcore": the package itself (__version__)
    ["files", "tables"],  # tables: HTML pages of rows (completions, samples), for objectives and evaluation
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
# The one import against the order: a data config's tokenizer may be the one saved with a run's checkpoint
# (tokenizer.path: a run folder or its `latest` pointer), found as init.init_from finds it, through the
# torch-free pointer module only (the data stages' code digests stay clear of the model side).
# (A training config's `model:` may be an HF folder: the config loader takes the reader as an argument.)
EXCEPTIONS = {("data/preprocessing/tokenizer.py", "ironcore.checkpoints.pointers")}


def _component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "ironcore"


def test_every_top_level_name_has_a_layer() -> None:
    names = {p.stem if p.suffix == ".py" else p.name for p in PACKAGE.iterdir() if p.name != "__pycache__"}
    assert names - {"__init__"} <= set(RANK), f"add {sorted(names - set(RANK) - {'__init__'})} to ORDER"


def test_imports_run_one_way() -> None:
    wrong, package = [], Package(PACKAGE)
    for path in sorted(PACKAGE.glob("**/*.py")):
        relative = path.relative_to(PACKAGE)
        own = relative.parts[0].removesuffix(".py") if len(relative.parts) > 1 or relative.stem != "__init__" \
            else "ironcore"
        for module in (i.module for i in package.imports(path)):
            target = _component(module)
            if target == own or (str(relative), module) in EXCEPTIONS:
                continue
            if RANK[target] >= RANK[own]:
                wrong.append(f"{relative} imports {module}")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


# Inside data/, by when the code runs: preprocessing below the samples and the demo data (neither imports
# the other); preprocessing is the torch-free stage and must stay so by structure, not by lazy imports.
DATA_ORDER = {"preprocessing": 0, "samples": 1, "demo": 1}


def _imports_torch(path: Path) -> bool:
    """Whether ``path`` imports torch anywhere (top level, in a function or under TYPE_CHECKING)."""
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
        if any(name.split(".")[0] == "torch" for name in names):
            return True
    return False


def test_data_folders_follow_the_lifecycle_and_preprocessing_never_imports_torch() -> None:
    package, data = Package(PACKAGE), PACKAGE / "data"
    assert {p.name for p in data.iterdir() if (p / "__init__.py").is_file()} == set(DATA_ORDER)
    assert sorted(p.name for p in data.glob("*.py")) == ["__init__.py"], "every data module sits in a lifecycle folder"
    wrong = []
    for path in sorted(data.glob("*/*.py")):
        own = path.parent.name
        for module in (i.module for i in package.imports(path)):
            parts = module.split(".")
            if parts[:2] == ["ironcore", "data"] and len(parts) > 2 and parts[2] != own:
                if DATA_ORDER[parts[2]] >= DATA_ORDER[own]:
                    wrong.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not wrong, "imports against data's lifecycle order:\n" + "\n".join(wrong)
    stage = package.closure(f"ironcore.data.preprocessing.{p.stem}" for p in (data / "preprocessing").glob("*.py")
                            if p.stem != "__init__")
    with_torch = [str(p.relative_to(PACKAGE)) for p in stage if _imports_torch(p)]
    assert not with_torch, f"the preprocessing stage's code imports torch: {with_torch}"


def test_what_the_snakefile_reads_configs_with_imports_no_torch() -> None:
    """The Snakefile is parsed at every Snakemake call, dry runs included: the modules it reads configs with
    (workflow/rules/common.smk) import no torch, directly or not (2 s a call)."""
    smk = (ROOT / "workflow" / "rules" / "common.smk").read_text()
    used = set(re.findall(r"^\s*from (ironcore[\w.]*) import", smk, re.MULTILINE))
    assert "ironcore.evaluation.task_config" in used
    closure = Package(PACKAGE).closure(sorted(used))
    with_torch = [str(p.relative_to(PACKAGE)) for p in closure if _imports_torch(p)]
    assert not with_torch, f"the Snakefile's config readers import torch: {with_torch}"


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


def test_the_design_map_names_every_folder_of_the_package() -> None:
    """docs/design.md's map of the package lists exactly its sub-packages and top-level modules, so a folder
    added, moved or removed shows up in the one page a newcomer reads first."""
    text = (ROOT / "docs" / "design.md").read_text()
    block = text.split("## The package", 1)[1].split("```", 2)[1]
    mapped = set(re.findall(r"^(\w+/|\w+\.py)\s", block, flags=re.M))
    actual = {f"{p.name}/" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    actual |= {p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    assert mapped == actual, f"in the map only: {sorted(mapped - actual)}; in the package only: {sorted(actual - mapped)}"


def test_every_function_of_the_package_fits_on_a_screen() -> None:
    """No function or method of ``ironcore/`` is longer than 80 lines (a loop that grows past that is doing
    several things: issue 33 split the ones that were)."""
    long = []
    for path in sorted(PACKAGE.glob("**/*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long, "functions over 80 lines:\n" + "\n".join(long)
