"""The docs' commands still work: blocks marked runnable run, and every ``ironcore`` command line names real flags.

A fenced ``bash`` block of README.md or docs/*.md is *runnable* when the line before its fence is an HTML
comment (invisible where the Markdown is rendered)::

    <!-- runnable -->                    run it; it must exit 0 within 300 s
    <!-- runnable timeout=900 slow -->   its own timeout, and pytest's ``slow`` marker
    <!-- runnable session=walk -->      run after the page's earlier blocks of session ``walk``, in their folder

Each block runs under ``bash -euo pipefail`` in a fresh temporary folder that holds a copy of ``configs/`` and
links to ``examples/`` and ``scripts/`` (the relative paths the docs name), with this Python's ``bin`` first on
PATH and the checkout on PYTHONPATH, so ``ironcore`` is this checkout's. Blocks share nothing, unless they are
of one session: a walk-through whose steps build on each other (one test runs the session's blocks in order,
each with its own timeout; the first block's options ``slow`` applies to the whole session). Mark the blocks
that take seconds; the rest are still checked by :func:`test_documented_ironcore_flags_exist` (sub-commands,
``--flags`` and config keys of overrides).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from ironcore.cli import build_parser
from ironcore.config.training import Config
from ironcore.data.preprocessing.config import DataConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"^\s*<!--\s*runnable\b(?P<options>[^>]*)-->\s*$")
FENCE = re.compile(r"^\s*(```+|~~~+)\s*(?P<lang>[\w-]*)")
DEFAULT_TIMEOUT = 300  # generous: a hang fails, a busy machine does not


@dataclasses.dataclass
class Block:
    path: Path
    line: int  # the fence's line (1-based)
    lang: str
    text: str
    options: str | None  # the runnable marker's options, None when not runnable

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    def option(self, name: str, default: str | None = None) -> str | None:
        """The value of the marker's ``name=VALUE`` option."""
        return next((o.split("=", 1)[1] for o in (self.options or "").split() if o.startswith(f"{name}=")), default)


def code_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, with the runnable marker of each (if any)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(fence.group(1))), len(lines))
        marker = MARKER.match(lines[i - 1]) if i else None
        blocks.append(Block(path, i + 1, fence.group("lang"), "\n".join(lines[i + 1 : end]),
                            marker.group("options") if marker else None))  # fmt: skip
        i = end + 1
    return blocks


def runnable_blocks() -> list:
    """One pytest param per runnable block, or per session (its blocks in page order)."""
    params, sessions = [], {}
    for path in DOCS:
        for block in code_blocks(path):
            if block.options is None:
                continue
            session = block.option("session")
            if session is not None and (path, session) in sessions:
                sessions[path, session].append(block)
                continue
            blocks = [block]
            if session is not None:
                sessions[path, session] = blocks
            marks = [pytest.mark.slow] if "slow" in block.options.split() else []
            params.append(pytest.param(blocks, id=block.where if session is None else f"{block.where}:{session}",
                                       marks=marks))
    return params


def test_runnable_markers_are_well_formed() -> None:
    """A marker sits right above a bash fence and says nothing but ``slow`` and ``timeout=SECONDS``: a typo
    must not quietly turn a block's test off."""
    problems = []
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if not (line.lstrip().startswith("<!--") and "runnable" in line):  # not prose that names the marker
                continue
            marker = MARKER.match(line)
            fence = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
            if marker is None or fence is None or fence.group("lang") not in ("bash", "sh"):
                problems.append(f"{path.relative_to(ROOT)}:{i + 1}: not a marker right above a ```bash fence")
                continue
            for option in marker.group("options").split():
                if option != "slow" and not re.fullmatch(r"timeout=\d+|session=[\w-]+", option):
                    problems.append(f"{path.relative_to(ROOT)}:{i + 1}: unknown option {option!r}")
    assert not problems, "\n".join(problems)
    assert runnable_blocks(), "no runnable blocks found"


@pytest.mark.parametrize("blocks", runnable_blocks())
def test_runnable_block(blocks: list[Block], tmp_path: Path) -> None:
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    for name in ("examples", "scripts"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}  # fmt: skip
    for block in blocks:
        timeout = int(block.option("timeout", str(DEFAULT_TIMEOUT)))
        try:
            proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block.text], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=timeout)  # fmt: skip
        except subprocess.TimeoutExpired as err:
            pytest.fail(f"{block.where}: still running after {timeout} s:\n{err.stdout}\n{err.stderr}")
        assert proc.returncode == 0, (f"{block.where} exited {proc.returncode}:\n{block.text}\n--- stdout\n"
                                      f"{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")  # fmt: skip


# ---- the flags of every documented command line -------------------------------------------------------------

# `ironcore SUB ...` where a command starts: at the start, after a shell separator, `-m` (`python -m ironcore`,
# `torchrun ... -m ironcore`) or an environment assignment (`PYTHONPATH=. ironcore`); not `--impls ironcore hf`.
COMMAND = re.compile(r"(?:^|[;&|($]|-m|\b[A-Z_]+=\S*)\s*ironcore\s+(?P<sub>[a-z][a-z-]*)(?P<rest>[^\n]*)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
OVERRIDE = re.compile(r"^(?P<key>[a-z_][a-z0-9_.]*)=")
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")


def command_lines(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every ``ironcore`` command line in the file's code blocks (continuations joined) and
    inline code spans."""
    found: list[tuple[int, str]] = []
    text = path.read_text(encoding="utf-8")
    in_block = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            in_block = not in_block
            continue
        if not in_block:
            found += [(number, span) for span in INLINE.findall(line)]
    for block in code_blocks(path):
        joined = re.sub(r"\\\n\s*", " ", block.text)
        for offset, line in enumerate(joined.splitlines(), 1):
            found.append((block.line + offset, line))
    commands = []
    for number, line in found:
        for match in COMMAND.finditer(line):
            # The command ends at a shell separator, a redirection or a comment; `\|` (a table's "or") stays.
            rest = re.split(r"\s(?:&&|\|\||;|>|#)|(?<!\\)\|(?!\|)", match.group("rest"))[0].replace("\\|", " ")
            commands.append((number, f"ironcore {match.group('sub')}{rest}"))
    return commands


def documented_commands() -> list:
    return [pytest.param(path, number, command, id=f"{path.relative_to(ROOT)}:{number}")
            for path in DOCS for number, command in command_lines(path)]  # fmt: skip


def _known_key(cls: type, key: list[str]) -> bool:
    """Does the dotted ``key`` name a field of dataclass ``cls`` (nested dataclasses followed; below a field
    that is not a dataclass, e.g. a dict of options, anything goes)?"""
    if not dataclasses.is_dataclass(cls) or not key:
        return True
    hints = typing.get_type_hints(cls)
    if key[0] not in hints:
        return False
    kind = hints[key[0]]
    nested = next((a for a in typing.get_args(kind) if dataclasses.is_dataclass(a)), kind)  # X | None
    return _known_key(nested, key[1:])


SUBPARSERS = next(a for a in build_parser()._actions if a.choices and "train" in a.choices).choices
OVERRIDES = {"train": Config, "preprocess": DataConfig}  # what KEY=VALUE positionals override


def command_problems(command: str) -> list[str]:
    """What is wrong with a documented ``ironcore SUB ...`` line: an unknown sub-command, flags its parser does
    not have (spelled out: argparse would accept a prefix), ``train``/``preprocess`` overrides of unknown keys."""
    sub = command.split()[1]
    if sub not in SUBPARSERS:
        return [f"no sub-command {sub!r}"]
    options = SUBPARSERS[sub]._option_string_actions
    problems = [f"`ironcore {sub}` has no {flag}" for flag in FLAG.findall(command) if flag not in options]
    if sub in OVERRIDES:
        for token in command.split()[2:]:
            key = OVERRIDE.match(token.strip("[]`"))
            if key and not _known_key(OVERRIDES[sub], key.group("key").split(".")):
                problems.append(f"no config key {key.group('key')!r} for `ironcore {sub}`")
    return problems


@pytest.mark.parametrize(("path", "number", "command"), documented_commands())
def test_documented_ironcore_flags_exist(path: Path, number: int, command: str) -> None:
    """Every ``ironcore SUB --flag`` in the docs (code blocks and inline code) names a sub-command and flags
    its parser has, and every ``KEY=VALUE`` override of ``train``/``preprocess`` a config key."""
    problems = command_problems(command)
    assert not problems, f"{'; '.join(problems)}: {command}"


def test_the_flag_check_sees_the_docs_commands() -> None:
    """The scan finds what it should and the check refuses what it should (guards against a regex that
    matches nothing); every sub-command is in the README's table."""
    readme = " ".join(command for _, command in command_lines(ROOT / "README.md"))
    for needle in ("ironcore model-info --model NAME --memory", "ironcore convert --to-hf", "--top-p"):
        assert needle in readme
    assert {f"ironcore {sub}" for sub in SUBPARSERS} <= {" ".join(c.split()[:2]) for _, c in
                                                         command_lines(ROOT / "README.md")}  # fmt: skip
    assert command_problems("ironcore trian --config c") == ["no sub-command 'trian'"]
    assert command_problems("ironcore generate --checkpoint d --max-new 4") == ["`ironcore generate` has no --max-new"]
    assert command_problems("ironcore train --config c optim.max_lrr=1 model.num_layers=2 trainer.objective_options.x=1"
                            ) == ["no config key 'optim.max_lrr' for `ironcore train`"]  # fmt: skip
    assert command_problems("ironcore preprocess --config c num_workers=4 --force") == []
