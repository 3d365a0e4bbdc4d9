"""Storage: the one place that knows how a URL is opened.

Every call goes through fsspec with the job's storage options (``filesystems``),
is retried on transient faults and sorted when it fails for good
(``faults.RetryPolicy``). Local paths come back as plain absolute paths;
remote URLs keep their protocol (``s3://bucket/key``). Local writes are
atomic and durable (``durable``); rasters are read through GDAL (``rasters``).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator
from typing import IO, Any, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from . import durable
from .faults import PERMANENT, RetryPolicy, TooLarge, is_transient
from .filesystems import Filesystems
from .listing import prefix_pages
from .rasters import OpenRasters, read_once
from .urls import OBJECT_STORES, is_local, protocol, url_like

log = logging.getLogger(__name__)

T = TypeVar("T")

# Stores whose fsspec backend creates a file only if absent in one request (s3fs: If-None-Match: *).
_CONDITIONAL_CREATE = frozenset({"s3", "s3a"})


class Storage:
    """fsspec access with storage options, retries and atomic commits.

    Picklable (it is sent to Ray actors): the cached filesystems are
    dropped and rebuilt on first use (``Filesystems``).

    About 200 lines because it is the whole storage vocabulary the rest of the
    package uses (read, write, create-new, commit, list, delete, rasters,
    Parquet), each method a few lines over ``faults.RetryPolicy``,
    ``durable.py`` and ``rasters.py``, which hold the logic.
    """

    def __init__(
        self,
        storage_options: dict[str, Any] | None = None,
        *,
        retries: int = 5,
        backoff_s: float = 0.2,
        max_backoff_s: float = 10.0,
    ):
        self._filesystems = Filesystems(storage_options)
        self._retrying = RetryPolicy(retries, backoff_s, max_backoff_s, redact=self._filesystems.redact)

    @property
    def retries(self) -> int:
        return self._retrying.retries

    @property
    def backoff_s(self) -> float:
        return self._retrying.backoff_s

    @property
    def max_backoff_s(self) -> float:
        return self._retrying.max_backoff_s

    def __repr__(self) -> str:
        # never the options: they may carry credentials
        options = "set" if self._filesystems else "none"
        return f"Storage(retries={self.retries}, backoff_s={self.backoff_s}, options={options})"

    def redact(self, text: str) -> str:
        """``text`` with every secret-looking option value masked."""
        return self._filesystems.redact(text)

    # -- filesystems ---------------------------------------------------------

    def options_for(self, proto: str) -> dict[str, Any]:
        """The fsspec options for one protocol (flat options skip local files and HTTP)."""
        return self._filesystems.options_for(proto)

    def fs(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """The filesystem for ``url`` (cached per protocol) and the path in it."""
        return self._filesystems.fs(url)

    def _on_fresh(self, what: str, url: str, op: Callable[[fsspec.AbstractFileSystem, str], T]) -> T:
        """``op(fs, path)`` on ``url``'s filesystem, its listing cache dropped (``Filesystems.fresh``), retried."""
        return self._retrying.call(what, url, lambda: op(*self._filesystems.fresh(url)))

    # -- reads and writes ----------------------------------------------------

    def read_bytes(self, url: str, max_bytes: int | None = None) -> bytes:
        """The whole file; ``TooLarge`` if it has more than ``max_bytes``.

        With a limit, one ranged GET of at most ``max_bytes + 1`` bytes: no
        HEAD for the size first, which would double the requests per image.
        """
        if max_bytes is None:
            return self._on_fresh("read", url, lambda fs, path: fs.cat_file(path))
        return self._on_fresh("read", url, lambda fs, path: _read_at_most(fs, path, max_bytes, url))

    def write_bytes(self, url: str, data: bytes) -> None:
        """Write a whole file; readers see the old file or the new one, never a part.

        On an object store (``OBJECT_STORES``) one PUT of the final key: the
        object appears whole when the upload completes, so writing aside and
        copying would double the requests for nothing. A local write is not
        atomic: the bytes go to a hidden file beside the target, are synced,
        and renamed over it (``durable.write_local``).
        """
        self._retrying.call("write", url, lambda: _write_whole(*self.fs(url), data, is_local(url)))

    def create_new(self, url: str, data: bytes) -> bool:
        """Write ``url`` only if it does not exist yet: True when this call made
        it, False when it already existed (whoever wrote it: a retried call
        whose first attempt landed also reads False, so callers that care read
        the file back and compare).

        Atomic where the store has a conditional create: locally a hard link
        of a synced file (``O_EXCL``'s effect without a moment of an empty
        file; plain ``O_EXCL`` where the filesystem has no hard links), on S3
        a PUT with ``If-None-Match: *`` (s3fs's ``mode="create"``; moto and
        AWS answer 412). Elsewhere (``_CONDITIONAL_CREATE`` lacks the
        protocol) it falls back to check-then-write, then reads back: two
        writers in the same instant may both see True there, which is logged.
        """
        proto = protocol(url)
        if is_local(url):
            return self._retrying.call("create", url, lambda: durable.create_local(self.fs(url)[1], data))
        if proto in _CONDITIONAL_CREATE:
            return self._retrying.call("create", url, lambda: _create_if_absent(*self.fs(url), data))
        log.warning("storage: %s has no conditional create; %s is created by check-then-write", proto, self.redact(url))
        if self.exists(url):
            return False
        self.write_bytes(url, data)
        return self.read_bytes(url) == data

    def open(self, url: str, mode: str = "rb") -> IO[Any]:
        """A file object (a context manager), for streaming reads or writes."""
        fs_of = self._filesystems.fresh if "r" in mode else self.fs
        return self._retrying.call("open", url, lambda: _opened(*fs_of(url), mode, is_local(url)))

    def exists(self, url: str) -> bool:
        return self._on_fresh("exists", url, lambda fs, path: bool(fs.exists(path)))

    def size(self, url: str) -> int:
        return self._on_fresh("size", url, lambda fs, path: int(fs.size(path)))

    def isdir(self, url: str) -> bool:
        return self._on_fresh("isdir", url, lambda fs, path: bool(fs.isdir(path)))

    # -- listings ------------------------------------------------------------

    def list_files(self, url_prefix: str) -> list[str]:
        """Every file under a folder or prefix (recursive), as full URLs, sorted."""
        found = self._on_fresh("list", url_prefix, lambda fs, path: fs.find(path))
        return sorted(url_like(url_prefix, p) for p in found)

    def list_pages(self, url_prefix: str) -> Iterator[list[str]] | None:
        """The files under an S3 prefix (recursive), as full URLs in key order, a batch of LIST
        pages at a time, its sub-prefixes listed several at once (``listing.prefix_pages``): the
        keys ``list_files`` finds, but a listing of 100 million keys streams instead of arriving
        whole at its end. Each request is retried on its own. None for any other store:
        ``list_files`` lists it."""
        fs, path = self.fs(url_prefix)
        if fs.protocol[0] not in ("s3", "s3a") or getattr(fs, "version_aware", False) or "/" not in path.strip("/"):
            return None  # (a whole bucket: find and its own listing rules, as before)
        bucket, _, key = path.strip("/").partition("/")

        def call(request: dict[str, Any]) -> dict[str, Any]:
            listed = url_like(url_prefix, f"{bucket}/{request['Prefix']}")  # errors name the prefix refused
            return self._on_fresh("list", listed, lambda fs, _: fs.call_s3("list_objects_v2", **request))

        pages = prefix_pages(call, bucket, key + "/")
        return ([url_like(url_prefix, f"{bucket}/{k}") for k in keys if not k.endswith("/")] for keys in pages)

    def glob(self, pattern: str) -> list[str]:
        """The files (not folders) matching a glob, as full URLs, sorted."""
        found = self._on_fresh("glob", pattern, lambda fs, path: fs.glob(path, detail=True))
        return sorted(url_like(pattern, p) for p, info in found.items() if info.get("type") != "directory")

    def listdir_names(self, url: str) -> list[str]:
        """The names (not paths) in a folder; [] when it does not exist."""
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self._on_fresh("list", url, _listed))

    # -- changes -------------------------------------------------------------

    def commit_file(self, tmp_url: str, final_url: str) -> None:
        """Publish ``tmp_url`` as ``final_url`` atomically, then drop ``tmp_url``.

        For a file already written elsewhere; bytes still in memory go to
        their final name with ``write_bytes`` instead (one PUT on object stores).
        """
        if is_local(tmp_url) and is_local(final_url):
            _, tmp = self.fs(tmp_url)
            _, final = self.fs(final_url)
            os.makedirs(os.path.dirname(final) or ".", exist_ok=True)
            self._retrying.call("commit", final_url, lambda: durable.replace_durably(tmp, final, sync_file=True))
            return

        def copy() -> None:
            fs, tmp = self.fs(tmp_url)
            fs.copy(tmp, self.fs(final_url)[1])

        # copy and delete as two retried steps: a retried delete that already
        # happened is fine, a retried move that half happened is not
        self._retrying.call("commit", final_url, copy)
        self.delete(tmp_url)

    def delete(self, url: str) -> None:
        """Remove a file or a folder with everything under it; missing is fine."""
        self._on_fresh("delete", url, _remove)

    def delete_files(self, urls: list[str]) -> None:
        """Remove files (not folders) of one filesystem in as few requests as it allows: one
        ``fs.rm`` of them all (s3fs sends 1000 keys a DeleteObjects; ``delete`` lists
        before each delete). Missing ones are fine."""
        if urls:
            paths = [self.fs(u)[1] for u in urls]
            self._on_fresh("delete", urls[0], lambda fs, _: _remove_files(fs, paths))

    def makedirs(self, url: str) -> None:
        """Create a folder (a no-op on object stores, which have none)."""
        if protocol(url) in OBJECT_STORES:
            return
        fs, path = self.fs(url)
        self._retrying.call("makedirs", url, lambda: fs.makedirs(path, exist_ok=True))

    def upload_file(self, local_path: str, url: str) -> None:
        """Publish a local file at ``url`` whole (a rename locally, one upload elsewhere)."""
        if is_local(url):
            _, final = self.fs(url)
            with durable.aside(final) as tmp:
                shutil.copyfile(local_path, tmp)  # beside the target: the rename below stays on one filesystem
                self._retrying.call("commit", url, lambda: durable.replace_durably(tmp, final, sync_file=True))
            return
        fs, path = self.fs(url)
        self._retrying.call("upload", url, lambda: fs.put_file(local_path, path))

    # -- rasters and parquet -------------------------------------------------

    def read_raster(self, url: str, read: Callable[[Any], T], kept: OpenRasters | None = None) -> T:
        """``read(dataset)`` on the rasterio dataset of ``url``: opened and read as one
        retried step (``rasters.read_once``: a fault GDAL hid is raised, and a step that
        failed closes its dataset, so a retry opens the raster afresh).

        kept: where this thread's dataset of ``url`` stays open after a good read,
        for the next read to reuse (``OpenRasters``).
        """
        return self._retrying.call("read", url, lambda: read_once(self.fs, url, read, kept))

    def write_parquet(self, table: pa.Table, url: str, **kw: Any) -> None:
        """Write ``table`` as one Parquet file (kw go to ``pyarrow.parquet.write_table``).

        Encoded in memory, then written whole: one PUT on object stores, and
        a retry starts from the bytes rather than from a half-written stream.
        """
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, **kw)
        self.write_bytes(url, sink.getvalue().to_pybytes())

    def read_parquet(self, url: str, columns: list[str] | None = None) -> pa.Table:
        """One Parquet file as a table (optionally only some columns)."""
        return self._on_fresh("read", url, lambda fs, path: _read_table(fs, path, columns, is_local(url)))

    def read_parquet_metadata(self, url: str) -> pq.FileMetaData:
        """A Parquet file's footer (schema, row count), without its data."""
        return self._on_fresh("read", url, _read_footer)


# -- one attempt of a call on its filesystem (Storage retries them) ---------------------


def _read_at_most(fs: fsspec.AbstractFileSystem, path: str, max_bytes: int, url: str) -> bytes:
    """The whole file in one ranged GET of at most ``max_bytes + 1`` bytes; ``TooLarge`` if it has more."""
    try:
        data = fs.cat_file(path, start=0, end=max_bytes + 1)
    except Exception as exc:
        # S3, GCS and HTTP refuse any byte range of an empty file (416): ask its size only then
        if is_transient(exc) or isinstance(exc, PERMANENT) or fs.size(path) != 0:
            raise
        data = b""
    if len(data) > max_bytes:
        raise TooLarge(f"{url}: more than the limit of {max_bytes} bytes")
    return data


def _write_whole(fs: fsspec.AbstractFileSystem, path: str, data: bytes, local: bool) -> None:
    """``data`` as the file at ``path``: written aside and renamed over it locally, one PUT elsewhere."""
    if local:
        durable.write_local(path, data)
    else:
        fs.pipe_file(path, data)


def _create_if_absent(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """A conditional create (``Storage.create_new``): True when it made the file, False when it existed."""
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    return True


def _opened(fs: fsspec.AbstractFileSystem, path: str, mode: str, local: bool) -> IO[Any]:
    """``path`` opened in ``mode``; a local file opened to write gets its folder first."""
    if local and any(m in mode for m in "wax"):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return fs.open(path, mode)


def _listed(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """The paths in a folder; [] when it does not exist."""
    try:
        return fs.ls(path, detail=False)
    except FileNotFoundError:
        return []


def _remove(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Remove a file or a folder with everything under it; missing is fine."""
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def _remove_files(fs: fsspec.AbstractFileSystem, paths: list[str]) -> None:
    try:
        fs.rm(paths)
    except FileNotFoundError:  # a local one was gone (object stores do not say): the rest one by one
        for path in paths:
            _remove(fs, path)


def _read_table(fs: fsspec.AbstractFileSystem, path: str, columns: list[str] | None, local: bool) -> pa.Table:
    if local:
        return pq.read_table(path, columns=columns)
    return pq.read_table(path, columns=columns, filesystem=fs)


def _read_footer(fs: fsspec.AbstractFileSystem, path: str) -> pq.FileMetaData:
    with fs.open(path, "rb") as f:
        return pq.read_metadata(f)
