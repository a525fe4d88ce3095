"""Atomic file writes: a crash or an error mid-write never leaves a half-written output file."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from prunecert.errors import ConfigError, PrunecertError


def printable(path: str | os.PathLike[str]) -> str:
    """`path` as text that can always be printed (undecodable bytes shown as escapes)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _existing_ancestor(path: Path) -> Path:
    for parent in path.absolute().parents:
        if parent.exists():
            return parent
    return Path("/")  # pragma: no cover - the root exists


def _check_path(path: Path, option: str) -> None:
    text = printable(path)
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{option} {text}: the path is not valid UTF-8; reports and records store paths as "
                          "UTF-8 text") from None
    ancestor = path if path.exists() else _existing_ancestor(path)
    if not ancestor.is_dir():
        raise ConfigError(f"{option} {text}: {printable(ancestor)} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {text}: {printable(ancestor)} is not writable")


def check_output_file(path: str | os.PathLike[str], option: str) -> Path:
    """Fail now, before any work, if `path` cannot become a file; creates nothing.

    Every command checks all its outputs this way before its first write, so a bad path never leaves
    half the outputs behind (DESIGN §9).
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option} {printable(path)}: is a folder; give a file name")
    _check_path(path.parent if path.exists() else path, option)
    return path


def check_output_dir(path: str | os.PathLike[str], option: str) -> Path:
    """Fail now, before any work, if `path` cannot be (or become) a folder to write into; creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {printable(path)}: {printable(path)} exists and is not a folder")
    _check_path(path, option)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_temps(parent, path.name)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise PrunecertError(f"cannot write {path}: {exc.strerror or exc}") from exc
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode open() would
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process (or not a pid we can ask about): leave its files alone
    return True


def sweep_stale_temps(folder: Path, name: str, suffix: str = ".tmp") -> None:
    """Remove `.NAME.PID.*SUFFIX` files (or folders) whose writer (PID) is gone: what a run killed between
    writing and renaming leaves behind. Those of a live process (another run writing now) stay."""
    prefix = f".{name}."
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if not (entry.name.startswith(prefix) and entry.name.endswith(suffix)):
            continue
        pid = entry.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
