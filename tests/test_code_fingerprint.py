"""The pipeline's code fingerprints: a stage's digest covers every ironcore file its entry points import.

``workflow/scripts/code_fingerprint.py`` names each stage's entry points; the files are the closure of their
imports (``workflow/scripts/import_graph.py``). These tests check that closure against two judges that do not
share its code, the interpreter (what importing the entry points loads) and the compiled bytecode (every
import instruction of every file in a digest), and that a new import, in each form the walker reads, moves
exactly the digests of the stages that reach it.
"""

from __future__ import annotations

import dis
import importlib.util
import inspect
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow" / "scripts"))

from code_fingerprint import STAGES, fingerprint_text, stage_files  # noqa: E402

PACKAGE = ROOT / "ironcore"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stage_loads_only_files_of_its_digest(stage: str) -> None:
    """Import the stage's entry points in a fresh interpreter; every ironcore file loaded is covered."""
    modules = [e for e in STAGES[stage] if isinstance(e, str)]
    scripts = [str(e) for e in STAGES[stage] if isinstance(e, Path)]
    code = (f"import importlib, json, runpy, sys\nfor name in {modules!r}: importlib.import_module(name)\n"
            f"for path in {scripts!r}: runpy.run_path(path)\n"  # (run_name is not __main__: imports only)
            "print(json.dumps(sorted(n for n in sys.modules if n == 'ironcore' or n.startswith('ironcore.'))))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    covered = set(stage_files(PACKAGE, stage))
    loaded = {Path(importlib.util.find_spec(name).origin).resolve() for name in json.loads(done.stdout)}
    assert loaded <= covered, f"{stage} runs files its digest leaves out: {sorted(map(str, loaded - covered))}"


def _bytecode_imports(path: Path, in_functions: bool) -> set[Path]:
    """The ironcore files that ``path``'s import instructions name (``in_functions``: also those inside its
    functions), read from the compiled code rather than the syntax tree."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts if path.is_relative_to(PACKAGE) else ()
    package = ".".join(parts if path.name == "__init__.py" else parts[:-1])
    names, codes = set(), [compile(path.read_text(), str(path), "exec")]
    while codes:
        code = codes.pop()
        instructions = list(dis.get_instructions(code))
        for i, instruction in enumerate(instructions):
            if instruction.opname == "IMPORT_NAME":
                level, fromlist = instructions[i - 2].argval, instructions[i - 1].argval
                name = importlib.util.resolve_name("." * level + instruction.argval, package)
                names |= {name, *(f"{name}.{item}" for item in fromlist or ())}
        codes += [c for c in code.co_consts if isinstance(c, types.CodeType)
                  and (in_functions or not c.co_flags & inspect.CO_OPTIMIZED)]  # class bodies run on load
    files = {PACKAGE.parent.joinpath(*name.split(".")) for name in names if name.split(".")[0] == "ironcore"}
    return {f / "__init__.py" if f.is_dir() else f.with_suffix(".py") for f in files} & set(PACKAGE.glob("**/*.py"))


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_import_of_a_digest_file_is_in_the_digest(stage: str) -> None:
    """Closed under imports: what an entry script or a covered file imports is covered (a package's
    ``__init__`` with its top level only: ``ironcore.cli``'s functions import every command)."""
    covered = set(stage_files(PACKAGE, stage))
    wanted = {path: _bytecode_imports(path, in_functions=path.name != "__init__.py") for path in covered}
    wanted |= {entry: _bytecode_imports(entry, True) for entry in STAGES[stage] if isinstance(entry, Path)}
    missing = {str(path): sorted(map(str, files - covered)) for path, files in wanted.items() if files - covered}
    assert not missing, f"{stage}: imported, but not in the digest: {missing}"


def _copy_package(tmp_path: Path) -> Path:
    package = tmp_path / "ironcore"
    shutil.copytree(PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "newthing").mkdir()
    (package / "newthing" / "__init__.py").write_text("")
    (package / "newthing" / "module.py").write_text("VALUE = 1\n")
    return package


IMPORTS = {  # each way of importing the new module, appended to ironcore/data/demo/corpus.py
    "top level": "import ironcore.newthing.module\n",
    "in a function": "def late():\n    from ironcore.newthing import module\n",
    "relative": "from ...newthing.module import VALUE\n",
    "module:attribute": 'PLUGIN = "ironcore.newthing.module:VALUE"\n',
    "f-string": 'def plugin(name):\n    return importlib.import_module(f"ironcore.newthing.{name}")\n',
}


@pytest.mark.parametrize("form", list(IMPORTS))
def test_a_new_import_joins_the_digests_of_the_stages_that_reach_it(form: str, tmp_path: Path) -> None:
    package = _copy_package(tmp_path)
    before = {stage: fingerprint_text(package, stage) for stage in STAGES}
    assert not any("newthing" in text for text in before.values())  # a module nothing imports reruns nothing
    corpus = package / "data" / "demo" / "corpus.py"
    corpus.write_text(corpus.read_text() + "\n\n" + IMPORTS[form])
    for stage in STAGES:
        reaches = corpus in stage_files(package, stage)
        joined = package / "newthing" / "module.py" in stage_files(package, stage)
        assert joined == reaches, stage
        assert (fingerprint_text(package, stage) != before[stage]) == reaches, stage
    assert "newthing/module.py" in fingerprint_text(package, "corpus")
