"""Raster reading through GDAL (rasterio), with the faults GDAL hides brought back.

Local files go to GDAL as paths; any other URL is read through the storage's
fsspec filesystem (rasterio's ``opener``), so storage options and endpoints
apply and GDAL asks for byte ranges, never the whole file. GDAL hides the
faults of the Python files it reads (a reset turns into a generic
RasterioIOError, or into nothing when GDAL reads again), so each read notes
the faults of its file's calls and, having seen one, is not trusted: it
raises the first (``read_once``), for ``Storage.read_raster`` to retry or sort.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import fsspec

from .faults import fault_kind
from .urls import is_local, is_utf8, local_path, percent_escaped

log = logging.getLogger(__name__)

T = TypeVar("T")
FsOf = Callable[[str], "tuple[fsspec.AbstractFileSystem, str]"]


def read_once(fs_of: FsOf, url: str, read: Callable[[Any], T], kept: OpenRasters | None = None) -> T:
    """``read(dataset)`` on the rasterio dataset of ``url``, opened (or taken from
    ``kept``) and read once; the first fault its file saw is raised in place of
    what GDAL made of it.

    fs_of: the filesystem of a URL and the path in it (``Storage.fs``).
    kept: where this thread's dataset of ``url`` stays open after a good read,
    for the next read to reuse (``OpenRasters``); a read that failed closes its
    dataset, so a retry opens the raster afresh.
    """
    held = kept.take(url) if kept is not None else None
    ds, faults = held if held is not None else (None, [])
    faults.clear()  # a kept dataset's opener still notes into its list
    try:
        with _surfacing(faults):
            if ds is None:
                ds = _open_raster(fs_of, url, faults)
            out = read(ds)
    except BaseException:
        if ds is not None:
            ds.close()
        raise
    if kept is None:
        ds.close()
    else:
        kept.keep(url, ds, faults)
    return out


def _open_raster(fs_of: FsOf, url: str, faults: list[BaseException]) -> Any:
    """A rasterio dataset for ``url``: a local path as is, any other URL
    through its fsspec filesystem, the faults seen noted in ``faults``
    (so is a local name that is not UTF-8: GDAL takes UTF-8 paths only)."""
    import rasterio

    fs, path = fs_of(url)
    if is_local(url) and is_utf8(path):
        return rasterio.open(path)
    if is_local(url):
        return rasterio.open(percent_escaped(path), opener=_FaultNotingOpener(fs, faults, escaped=True))
    return rasterio.open(path, opener=_FaultNotingOpener(fs, faults))


@contextlib.contextmanager
def _surfacing(faults: list[BaseException]) -> Iterator[None]:
    """Raise the first fault noted in ``faults`` in place of GDAL's own error,
    or of its success: GDAL reports neither faithfully."""
    try:
        yield
    except Exception:
        if faults:
            raise faults[0]  # noqa: B904  (the cause GDAL's own error hides; GDAL's stays as its context)
        raise
    if faults:
        raise faults[0]


class OpenRasters:
    """Rasters kept open between reads, at most one per thread: the tiles of a
    scene read one after another by one I/O thread share its dataset, so its
    header is read once and its file's read-ahead serves the next tile too.

    A dataset is only ever read by the thread that opened it (GDAL's datasets
    are not thread-safe) and at most one per thread is kept, which bounds the
    memory (each holds its file's read-ahead block and GDAL's block cache).
    ``close`` closes them all, from any thread, at the end of a shard.
    """

    def __init__(self) -> None:
        self._held: dict[int, tuple[str, Any, list[BaseException], contextvars.Context]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def take(self, url: str) -> tuple[Any, list[BaseException]] | None:
        """This thread's dataset of ``url`` and its fault list, now the caller's;
        None when it holds none (one of another raster is closed)."""
        with self._lock:
            held = self._held.pop(threading.get_ident(), None)
        if held is None:
            return None
        if held[0] != url:
            _close_in(held)
            return None
        return held[1], held[2]

    def keep(self, url: str, ds: Any, faults: list[BaseException]) -> None:
        """Keep ``ds`` open as this thread's (closing the one it held, if any)."""
        # rasterio's opener registers the file in this thread's context: it must close there
        held = (url, ds, faults, contextvars.copy_context())
        with self._lock:
            if self._closed:  # a read that outlived its shard (one cancelled midway)
                old = held
            else:
                old = self._held.pop(threading.get_ident(), None)
                self._held[threading.get_ident()] = held
        if old is not None:
            _close_in(old)

    def close(self) -> None:
        """Close every kept dataset, and any kept from now on (from any thread)."""
        with self._lock:
            held, self._held, self._closed = list(self._held.values()), {}, True
        for h in held:
            _close_in(h)

    def __len__(self) -> int:
        return len(self._held)


def _close_in(held: tuple[str, Any, list[BaseException], contextvars.Context]) -> None:
    """Close a kept dataset in the context it was opened in; a failing close only logs."""
    ds, ctx = held[1], held[3]
    try:
        ctx.run(ds.close)
    except Exception as exc:  # a fault of the file's close: nothing was left to read from it
        log.debug("closing a kept raster failed: %s: %s", type(exc).__name__, exc)


class _FaultNotingOpener:
    """An fsspec filesystem as rasterio's opener that notes in ``faults`` the
    storage faults of its calls (``fault_kind``) and every fault of its files' reads.

    A failed read returns no bytes rather than raising: rasterio's bridge to
    GDAL cannot carry an exception (during an open the process aborts in C++).
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, faults: list[BaseException], escaped: bool = False):
        self._fs = fs
        self._faults = faults
        # escaped: GDAL was given a local name that is not UTF-8 as ``percent_escaped`` (it takes
        # UTF-8 only): each path it asks for (the file, or a sidecar such as .ovr) is mapped back
        self._escaped = escaped

    def open(self, path: str, mode: str = "rb", **kw: Any) -> _FaultNotingFile:
        return _FaultNotingFile(self._noted(self._fs.open)(path, mode, **kw), self._faults)

    def __getattr__(self, name: str) -> Any:  # size, isfile, isdir, ls: GDAL's stat and listing
        attr = getattr(self._fs, name)
        return self._noted(attr) if callable(attr) else attr

    def _noted(self, fn: Callable[..., T]) -> Callable[..., T]:
        def call(*args: Any, **kw: Any) -> T:
            if self._escaped and args and isinstance(args[0], str):
                args = (local_path("file://" + args[0]).removeprefix("file://"), *args[1:])
            try:
                out = fn(*args, **kw)
                return _escaped_names(out) if self._escaped else out
            except Exception as exc:
                # GDAL would report a refused or throttled read as a damaged file: keep the real cause
                if fault_kind(exc) is not None:
                    self._faults.append(exc)
                raise

        return call


def _escaped_names(out: Any) -> Any:
    """A listing's names ``percent_escaped`` (for GDAL, which takes UTF-8 only); anything else as it is."""
    if isinstance(out, str):
        return out if is_utf8(out) else percent_escaped(out)
    if isinstance(out, list):
        return [_escaped_names(v) for v in out]
    if isinstance(out, dict) and isinstance(out.get("name"), str):
        return {**out, "name": _escaped_names(out["name"])}
    return out


class _FaultNotingFile:
    """A file object for GDAL whose failed reads return b"" and are noted in ``faults``
    (any fault: a short read makes what GDAL returns untrustworthy)."""

    def __init__(self, f: Any, faults: list[BaseException]):
        self._f = f
        self._faults = faults

    def read(self, size: int = -1) -> bytes:
        try:
            return self._f.read(size)
        except Exception as exc:
            self._faults.append(exc)
            return b""

    def __enter__(self) -> _FaultNotingFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.close()

    def __getattr__(self, name: str) -> Any:  # seek, tell, close
        return getattr(self._f, name)
