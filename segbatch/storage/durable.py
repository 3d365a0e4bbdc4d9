"""Local-disk writes that are atomic and durable: a reader, or a restart after a
crash or power loss, finds the old file or the whole new one, never a part.

The bytes go to a hidden file beside the target (``aside``), are synced, and
are renamed over it (``replace_durably``), or hard-linked to it for a create
that must not overwrite (``create_local``). Object stores need none of this:
an object appears whole when its upload completes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Iterator

_NO_HARD_LINKS = frozenset(getattr(errno, n) for n in ("EPERM", "ENOTSUP", "EOPNOTSUPP", "ENOSYS") if hasattr(errno, n))


@contextlib.contextmanager
def aside(path: str) -> Iterator[str]:
    """A hidden name beside ``path`` for its bytes in the making, removed on the way
    out unless it was renamed away: a reader of the folder (pyarrow, Spark and Polars
    skip dot files; ``*.parquet`` globs miss it) never sees a part, and the rename
    to ``path`` stays on one filesystem. Creates ``path``'s folder."""
    folder, name = os.path.split(path)
    os.makedirs(folder or ".", exist_ok=True)
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def replace_durably(src: str, dst: str, sync_file: bool = False) -> None:
    """Rename ``src`` over ``dst`` so that after a crash or power loss ``dst``
    is the old file or the whole new one.

    sync_file: sync ``src``'s data first (callers that wrote it themselves
    already did): ext4 and XFS may otherwise commit the rename before the
    blocks, leaving the new name on an empty file. The folder is synced
    after, or the rename itself may be lost.
    """
    if sync_file:
        with open(src, "rb") as f:
            os.fsync(f.fileno())
    os.replace(src, dst)
    fsync_dir(os.path.dirname(dst) or ".")


def fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows opens no folder; NTFS journals its renames
        return
    try:
        os.fsync(fd)
    except OSError:  # some network filesystems refuse a folder's fsync
        pass
    finally:
        os.close(fd)


def write_synced(path: str, data: bytes, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> None:
    with os.fdopen(os.open(path, flags, 0o644), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_local(path: str, data: bytes) -> None:
    """``path`` replaced by ``data`` whole: written aside, synced, renamed over it."""
    with aside(path) as tmp:
        write_synced(tmp, data)
        replace_durably(tmp, path)


def create_local(path: str, data: bytes) -> bool:
    """``path`` with ``data`` if it does not exist (True), else False; see ``Storage.create_new``."""
    with aside(path) as tmp:
        write_synced(tmp, data)
        try:
            os.link(tmp, path)  # fails if path exists, and path never shows less than all of data
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            try:  # a filesystem without hard links (FAT, some SMB mounts): O_EXCL, empty for a moment
                write_synced(path, data, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                return False
        fsync_dir(os.path.dirname(path) or ".")
        return True
