"""Files written whole or not at all: a temporary file beside the target, then a rename.

The one way every command writes a file (the data cache, the workdir's files, torch's
checkpoints, the compare tools' outputs): the rename replaces a symbolic link at the target
itself, never the file it points to; the file gets the user's umask. Imports neither jax nor
torch.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from flax_impl.common.errors import ConfigError


def _umask() -> int:
    """The process's umask, read without changing it (another thread may be creating files)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):  # not Linux
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


# Devices' and the kernel's directories take no files of ours (root could write some of /dev);
# /dev/shm is a RAM disk for files.
SYSTEM_DIRS, RAM_DISK = (Path("/dev"), Path("/proc"), Path("/sys")), Path("/dev/shm")


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Create or replace `path` with what `write(file)` writes; a crash leaves the old file.
    OSError naming `path` (not the temporary file) if the directory takes no new file, or if
    `path` is a device, a pipe or a socket (a rename would replace it)."""
    where = Path(os.path.realpath(path.parent))
    if any(d == where or d in where.parents for d in SYSTEM_DIRS) and not (
            RAM_DISK == where or RAM_DISK in where.parents):
        raise PermissionError(errno.EACCES, "the directory takes no new files", str(path))
    if path.exists() and not path.is_symlink() and not path.is_file():
        raise PermissionError(errno.EACCES, "not a regular file: it is not replaced", str(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    except OSError as error:
        if error.errno == errno.ENOENT and path.parent.is_dir():  # /proc, /sys: no new files
            raise PermissionError(errno.EACCES, "the directory takes no new files",
                                  str(path)) from None
        raise type(error)(error.errno, error.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), 0o666 & ~_umask())  # mkstemp's 0600 hides it from the group
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_output(path: Path, write: Callable[[BinaryIO], object],
                 inputs: Iterable[Path] = ()) -> None:
    """A command's output file `path`, written by `atomic_write` under the name given:
    ConfigError (one line) if it is a directory or one of the command's `inputs`; OSError if it
    cannot be written."""
    path = Path(path)
    if not path.name or path.is_dir():
        raise ConfigError(f"{path} is a directory; name a file to write")
    for source in inputs:
        if path.exists() and Path(source).exists() and os.path.samefile(path, source):
            raise ConfigError(f"{path} is this command's input {source}; name another file "
                              f"to write")
    atomic_write(path, write)
