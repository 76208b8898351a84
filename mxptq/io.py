"""Atomic file writes: every file mxptq writes (reports, GPTQ per-layer checkpoints, rotation
decisions, packed checkpoints) goes through here, so a crash or Ctrl-C never leaves a
half-written file where a later run would read it.

How: write to a temporary file in the *same directory* (os.replace is only atomic within one
file system), flush + fsync the data, os.replace over the target, then fsync the directory so
the rename itself survives a power loss (POSIX: rename durability needs the parent dir synced).

The temporary file is created with mode 0o666 (a directory 0o777) and the process umask applies,
as for a plain open(): tempfile.mkstemp's 0600 (mkdtemp's 0700) would stay on the final file, and
a report or checkpoint would be unreadable to the rest of a shared cluster (issue 29).

A process killed mid-write (SIGKILL, OOM) leaves its temporary file behind (issue 30). The writer
holds an exclusive flock on its temporary file while it lives, and the kernel drops the lock when
the process dies; so each write removes the unlocked temporary files of the same target, and never
a live writer's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

try:
    import fcntl  # the temporary files' locks (see above)
except ImportError:  # Windows: no flock, so orphaned temporary files stay
    fcntl = None

T = TypeVar("T")


def fsync_dir(directory: Path) -> None:
    # Directories cannot be opened for fsync on Windows; there the rename is the best we get.
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name_pattern(target: Path) -> re.Pattern[str]:
    # The name atomic_path gives: ".{name}." + 8 characters of [a-z0-9_] (as CPython's tempfile)
    # + ".tmp"; exact, so another target's temporary file (".{name}.bin.….tmp") never matches.
    return re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}\.tmp")


_TEMP_NAME_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789_"  # CPython tempfile's


def _create_unique(directory: Path, prefix: str, suffix: str, create: Callable[[Path], T]) -> T:
    """`create(path)` for the first name prefix + 8 random characters + suffix that is not taken
    (`create` raises FileExistsError for a taken one), as tempfile.mkstemp picks names."""
    for _ in range(tempfile.TMP_MAX):
        name = prefix + "".join(secrets.choice(_TEMP_NAME_CHARACTERS) for _ in range(8)) + suffix
        try:
            return create(directory / name)
        except FileExistsError:
            continue
    raise FileExistsError(f"{directory}: no unused temporary name {prefix}XXXXXXXX{suffix}")


def _create_temp_file(directory: Path, prefix: str, suffix: str) -> tuple[int, Path]:
    """mkstemp, but with the mode a plain open() gives (see the module docstring)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    return _create_unique(directory, prefix, suffix, lambda path: (os.open(path, flags, 0o666), path))


def make_temp_dir(directory: str | os.PathLike[str], prefix: str) -> Path:
    """mkdtemp, but with the mode a plain mkdir gives (see the module docstring): for a directory
    written whole and renamed into place (a packed checkpoint)."""

    def make(path: Path) -> Path:
        path.mkdir(mode=0o777)
        return path

    return _create_unique(Path(directory), prefix, "", make)


def writable_dir_problem(directory: str | os.PathLike[str]) -> str | None:
    """Why files cannot be written into `directory` (created if missing), or None. Checked before
    a run loads its model, so a bad output directory fails at once, not at save time (issue 29)."""
    existing = Path(directory)
    while not os.path.lexists(existing) and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is {'a file' if existing.is_file() else 'not a directory'}"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def remove_orphaned_temp_files(target: Path) -> None:
    """Remove the temporary files of `target` that no live writer holds (see the module docstring)."""
    if fcntl is None:
        return
    pattern = _temp_name_pattern(target)
    for candidate in target.parent.iterdir():
        if not pattern.fullmatch(candidate.name):
            continue
        try:
            fd = os.open(candidate, os.O_RDWR)
        except OSError:  # renamed or removed meanwhile, or not ours to open
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # locked: a writer is alive
            continue
        else:
            candidate.unlink(missing_ok=True)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on normal exit it is fsynced and renamed onto
    `path`, on an exception it is removed and `path` is left untouched.

    For writers that need a file name rather than bytes (e.g. safetensors.torch.save_file).
    Parent directories are created; earlier writers' orphaned temporary files of `path` removed.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_orphaned_temp_files(target)
    fd, tmp_path = _create_temp_file(target.parent, f".{target.name}.", ".tmp")
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    try:
        if fcntl is None:  # Windows: no flock, and a file still open there cannot be renamed
            os.close(fd)
        else:
            # Held until the end: marks the file as a live writer's. A file system without locks
            # refuses the cleaner's lock too, so there the write goes on and orphans stay.
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield tmp_path
        with open(tmp_path, "rb+") as written:
            os.fsync(written.fileno())
        # A writer that replaced the file (safetensors writes its own 0600 temporary file and
        # renames it) gets back the mode our open gave.
        if stat.S_IMODE(os.stat(tmp_path).st_mode) != mode:
            os.chmod(tmp_path, mode)
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    finally:
        if fcntl is not None:
            os.close(fd)
    fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` atomically; returns the path."""
    target = Path(path)
    with atomic_path(target) as tmp_path, open(tmp_path, "wb") as out:
        out.write(data)
        out.flush()
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int = 2) -> Path:
    """Write `obj` as JSON (sorted keys, trailing newline: diffable) atomically.

    Serialization happens before the file is touched, so an object that is not JSON-able
    raises TypeError and leaves any existing file intact. NaN/inf are refused (allow_nan=False):
    they are not JSON and other tools would fail to read the report.
    """
    text = json.dumps(obj, indent=indent, sort_keys=True, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


def atomic_save_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """safetensors.torch.save_file, atomically. Tensors must be contiguous (safetensors' rule)."""
    from safetensors.torch import save_file  # lazy: keeps `mxptq --help` fast

    target = Path(path)
    with atomic_path(target) as tmp_path:
        save_file(dict(tensors), str(tmp_path), metadata=dict(metadata) if metadata else None)
    return target


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (calibration windows in cache keys)."""
    digest = hashlib.sha256(f"{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
    # Bytes through a uint8 view: numpy has no bfloat16.
    digest.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
