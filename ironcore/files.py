"""Reading and writing files safely: one line naming the file for any bad input, nothing half-written
looks complete, no result is lost to a path found bad too late.

Every config, JSON and text file IronCore reads goes through :func:`read_text`,
:func:`read_json` or :func:`read_yaml`: a missing, empty, unreadable, non-UTF-8
or unparsable file, or a folder in its place, is one error line that names the
file (and line). Every output it writes goes through the rest:

* :func:`write_text_atomically` and :func:`build_folder` write into a
  temporary sibling (``.NAME.tmp-PID-…``) and rename it into place, so a
  crash or a kill leaves either the old file or folder or the new one, never a
  torn one. Folders get the permissions of the process umask, like any other
  tool's (``tempfile.mkdtemp`` alone would make them private to their owner).
* :func:`remove_stale_temps` deletes the temporaries that killed processes
  left behind (their PID is no longer alive), on the next run.
* :func:`check_writable` fails *before* the work starts, with one line naming
  the path, when an output cannot be written: it exists as the wrong kind of
  thing, sits under a file, or its folder is read-only.
* :func:`describe_os_error` turns an ``OSError`` into one line that names the
  path and says what happened ("no space left on device").
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ironcore.errors import ConfigError, DataError, UserError


class OutputError(UserError, OSError):
    """An output cannot be written: the message names the path and the reason."""


def read_text(path: str | Path, what: str = "file", error: type[UserError] = DataError,
              keep_line_endings: bool = False) -> str:  # fmt: skip
    """The UTF-8 text of ``path`` (``keep_line_endings``: CRLF kept, byte for byte); ``error`` naming it (and
    saying it is the ``what``) when it cannot be read."""
    path = Path(path)
    try:
        return path.read_bytes().decode("utf-8") if keep_line_endings else path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: no such file ({what})") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder, expected the {what}") from None
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text (byte {err.start}); the {what} must be saved as UTF-8") from None
    except OSError as err:
        raise error(f"{describe_os_error(err, path)} (the {what})") from None


def read_json(path: str | Path, what: str = "JSON file", error: type[UserError] = DataError) -> dict[str, Any]:
    """The JSON object in ``path`` (every JSON file IronCore reads holds one), or ``error`` naming the file."""
    path = Path(path)
    text = read_text(path, what, error)
    if not text.strip():
        raise error(f"{path}: empty file, expected the {what}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{path}:{err.lineno}: invalid JSON ({err.msg}); expected the {what}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object (the {what}), got {type(data).__name__}")
    return data


def read_yaml(path: str | Path, what: str = "config", error: type[UserError] = ConfigError) -> dict[str, Any]:
    """The YAML mapping in ``path``, or ``error`` naming the file (and line): an empty file is an error too, and
    so is a key given twice in one mapping (see :func:`parse_yaml`)."""
    path = Path(path)
    data = parse_yaml(read_text(path, what, error), str(path), error)
    if data is None:
        raise error(f"{path}: empty file, expected the {what} (a mapping of keys to values)")
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping of keys to values (the {what}), got {type(data).__name__}")
    return data


def parse_yaml(text: str, source: str, error: type[UserError] = ConfigError) -> Any:
    """The value of the YAML ``text`` (safe types only), or ``error`` naming ``source`` (and line) in one line.

    Every YAML that IronCore (and its pipeline) reads is parsed here, with :func:`yaml_loader`: a key given
    twice in one mapping is refused, naming the key and both lines, where PyYAML would keep the last one and
    silently drop the first one's settings.
    """
    import yaml  # here, not at the top: the CLI imports this module and `ironcore --help` stays fast

    try:
        return load_yaml_text(text)
    except DuplicateKeyError as err:
        raise error(f"{source}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise error(f"{source}{where}: invalid YAML: {problem}") from None


class DuplicateKeyError(ValueError):
    """A key given twice in one YAML mapping (raised by :func:`yaml_loader`'s loader; the message names both lines)."""

    def __init__(self, key: Any, first: int, second: int) -> None:
        self.key, self.first, self.second = key, first, second
        lines = f"line {first}" if first == second else f"lines {first} and {second}"
        super().__init__(f"key {key!r} given twice ({lines})")


def load_yaml_text(text: str) -> Any:
    """The value of the YAML ``text`` through :func:`yaml_loader` (safe types only, a key given twice raises
    :class:`DuplicateKeyError`); PyYAML's errors pass through."""
    loader = yaml_loader()(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


@functools.cache
def yaml_loader() -> type:
    """PyYAML's ``SafeLoader``, but a mapping that gives a key twice raises :class:`DuplicateKeyError` (keys
    merged in with ``<<`` may be overridden, as YAML intends)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
            if isinstance(node, yaml.MappingNode):
                seen: dict[Any, int] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                    try:
                        if key in seen:
                            raise DuplicateKeyError(key, seen[key], line)
                    except TypeError:  # an unhashable key: the SafeLoader's own error says so
                        continue
                    seen[key] = line
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_prefix(final: Path) -> str:
    """The name prefix of ``final``'s temporaries, with this process's PID (see :func:`remove_stale_temps`)."""
    return f".{final.name}.tmp-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but someone else's
        return True
    return True


def remove_stale_temps(folder: str | Path, name: str = "*") -> list[Path]:
    """Delete the temporaries ``.NAME.tmp-PID-…`` in ``folder`` whose process is gone; returns them."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.glob(f".{name}.tmp-*"):
        pid = path.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def describe_os_error(err: OSError, path: str | Path | None = None) -> str:
    """One line: the path and what went wrong, in words ("no space left on device")."""
    where = path or err.filename or ""
    reason = os.strerror(err.errno).lower() if err.errno else str(err)
    if err.errno == errno.ENOSPC:
        reason = "no space left on device"
    return f"{where}: {reason}" if where else reason


def build_folder(final: str | Path, write: Callable[[Path], None], last: str | None = None) -> Path:
    """Call ``write(tmp)`` on a temporary folder, then put its contents in place as ``final``.

    Normally the temporary is a sibling renamed to ``final`` (the old
    ``final``, if any, is renamed away first and deleted last). When
    ``final`` is a folder that cannot be renamed -- a mount point, or one in a
    read-only parent -- the temporary is built inside it and its entries are
    moved up, the one named ``last`` (the marker of a complete folder, e.g.
    ``metadata.json``) at the very end. The temporary is removed on any
    failure; an ``OSError`` becomes an :class:`OutputError` naming ``final``.
    """
    final = Path(final)
    in_place = final.is_dir() and (os.path.ismount(final) or not _writable(final.parent))
    if not in_place:
        final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(final), dir=final if in_place else final.parent))
    try:
        write(tmp)
        _follow_umask(tmp)
        if in_place:
            _move_up(tmp, final, last)
        elif final.exists():
            old = final.with_name(f"{temp_prefix(final)}old")
            final.rename(old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and not isinstance(err, UserError):
            raise OutputError(describe_os_error(err, final)) from None
        raise
    return final


def _follow_umask(folder: Path) -> None:
    """Give ``folder`` and everything in it the permissions of the umask (libraries write some files 0600)."""
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _move_up(tmp: Path, final: Path, last: str | None) -> None:
    """Replace ``final``'s entries by ``tmp``'s: the marker goes first out and last in."""
    if last and (final / last).exists():
        (final / last).unlink()
    for entry in final.iterdir():
        if entry != tmp:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    entries = sorted(tmp.iterdir(), key=lambda e: e.name == last)
    for entry in entries:
        os.replace(entry, final / entry.name)
    tmp.rmdir()


def write_text_atomically(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling and a rename: the old or the new file, never half."""
    path = Path(path)
    tmp = path.with_name(f"{temp_prefix(path)}{os.urandom(4).hex()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputError(describe_os_error(err, path)) from None


def check_writable(path: str | Path, kind: str = "file") -> Path:
    """Fail now, in one line naming ``path``, if a ``kind`` ("file" or "folder") cannot be written there."""
    path = Path(path)
    if path.exists():
        if kind == "file" and path.is_dir():
            raise OutputError(f"{path}: is a folder, expected a file to write")
        if kind == "folder" and not path.is_dir():
            raise OutputError(f"{path}: is a file, expected a folder to write into")
    existing = path if path.exists() and kind == "folder" else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{path}: cannot be created, {existing} is a file")
    if not _writable(existing):
        raise OutputError(f"{path}: cannot write there, {existing} is not writable")
    return path


def _writable(folder: Path) -> bool:
    """Whether this process may create entries in ``folder``, judged by its effective ids and capabilities (a
    root process without CAP_DAC_OVERRIDE is refused like anyone else)."""
    return os.access(folder, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids)
