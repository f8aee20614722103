"""The pipeline's code fingerprints: every stage covers the whole package minus stated exclusions.

``workflow/scripts/code_fingerprint.py`` lists, per stage, the files it does not run; everything else
of ``ironcore/**/*.py`` is part of the stage's digest. These tests check the two ways that could go
wrong: a stage importing a file its digest leaves out, and a new file not reaching every stage.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow" / "scripts"))

from code_fingerprint import STAGES, fingerprint_text, stage_files  # noqa: E402

PACKAGE = ROOT / "ironcore"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stage_imports_only_files_of_its_digest(stage) -> None:
    """Import what the stage's command imports in a fresh interpreter; every ironcore file loaded is covered."""
    code = (f"import importlib, json, sys\nfor name in {list(STAGES[stage].runs)!r}: importlib.import_module(name)\n"
            "print(json.dumps(sorted(n for n in sys.modules if n == 'ironcore' or n.startswith('ironcore.'))))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    covered = set(stage_files(PACKAGE, stage))
    loaded = {Path(importlib.util.find_spec(name).origin).resolve() for name in json.loads(done.stdout)}
    assert loaded <= covered, f"{stage} runs files its digest excludes: {sorted(map(str, loaded - covered))}"


def test_a_new_sub_package_reaches_every_stage(tmp_path) -> None:
    package = tmp_path / "ironcore"
    for path in PACKAGE.glob("**/*.py"):
        (package / path.relative_to(PACKAGE)).parent.mkdir(parents=True, exist_ok=True)
        (package / path.relative_to(PACKAGE)).write_text(path.read_text())
    before = {stage: fingerprint_text(package, stage) for stage in STAGES}
    (package / "newthing").mkdir()
    (package / "newthing" / "module.py").write_text("VALUE = 1\n")
    for stage in STAGES:
        assert package / "newthing" / "module.py" in stage_files(package, stage), stage
        assert fingerprint_text(package, stage) != before[stage], stage
