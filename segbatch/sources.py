"""SOURCE to a sorted list of image URIs: folders, globs, URL prefixes, manifests."""

from __future__ import annotations

import logging
import os
import posixpath

import fsspec.core
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .errors import UsageError
from .storage import Storage, is_local

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp"})
MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet")
ACCEPTED = (
    "SOURCE can be a folder (searched recursively), a glob (/data/*.jpg, s3://bucket/p/**/*.png), "
    "a URL prefix (s3://bucket/prefix/, gs://..., file://...), or a manifest "
    "(.txt with one URI a line, or .csv/.parquet with a 'uri' column)"
)
_GLOB_CHARS = frozenset("*?[")


class SourceError(UsageError, ValueError):
    """SOURCE cannot be turned into a list of images."""


def list_sources(source: str, storage: Storage) -> list[str]:
    """The URIs SOURCE names, sorted and de-duplicated.

    Folders, prefixes and globs keep image files only (by extension);
    manifests keep every URI as given, so a bad one becomes an error row.
    """
    if any(c in _GLOB_CHARS for c in source):
        uris = _images(storage.glob(source))
        if not uris:
            raise SourceError(f"no images found matching {source} ({_extensions()})")
    elif source.lower().endswith(MANIFEST_SUFFIXES):
        uris = _manifest_or_folder(source, storage)
    else:
        uris = _folder(source, storage)
    uris = sorted(set(uris))
    log.info("%d images in %s", len(uris), source)
    return uris


def _folder(source: str, storage: Storage) -> list[str]:
    files = storage.list_files(source)
    if not files and not storage.exists(source):
        raise SourceError(f"SOURCE {source} does not exist. {ACCEPTED}")
    uris = _images(files)
    if not uris:
        raise SourceError(f"no images found under {source} ({_extensions()})")
    return uris


def _manifest_or_folder(source: str, storage: Storage) -> list[str]:
    try:
        data = storage.read_bytes(source)
    except IsADirectoryError:  # a folder that happens to be named like a manifest
        return _folder(source, storage)
    except FileNotFoundError:
        raise SourceError(f"SOURCE {source} does not exist. {ACCEPTED}") from None
    uris = read_manifest(source, data)
    if not uris:
        raise SourceError(f"no images found under {source}: the manifest lists no URIs")
    return uris


def read_manifest(source: str, data: bytes) -> list[str]:
    """The URIs of a manifest's bytes, relative ones resolved against its folder."""
    suffix = source.lower().rsplit(".", 1)[-1]
    if suffix == "txt":
        # splitting the bytes beats any parser for one-column text
        lines = (line.strip() for line in data.decode("utf-8-sig").splitlines())
        uris = [line for line in lines if line and not line.startswith("#")]
    elif suffix == "csv":
        try:
            table = pacsv.read_csv(pa.BufferReader(data), convert_options=pacsv.ConvertOptions(column_types={"uri": pa.string()}))
        except pa.ArrowInvalid as exc:
            raise SourceError(f"manifest {source} is not a readable CSV: {exc}") from None
        uris = _column(table, _uri_column(table.column_names, source))
    else:
        try:
            names = pq.read_schema(pa.BufferReader(data)).names
            table = pq.read_table(pa.BufferReader(data), columns=[_uri_column(names, source)])
        except pa.ArrowInvalid as exc:
            raise SourceError(f"manifest {source} is not a readable Parquet file: {exc}") from None
        uris = _column(table, table.column_names[0])
    return _resolve(uris, source)


def _uri_column(names: list[str], source: str) -> str:
    for name in names:
        if name.strip().lower() == "uri":
            return name
    raise SourceError(f"manifest {source} has no 'uri' column; its columns are: {', '.join(map(repr, names)) or 'none'}")


def _column(table: pa.Table, name: str) -> list[str]:
    values = table.column(name).cast(pa.string()).to_pylist()
    return [v.strip() for v in values if v and v.strip()]


def _resolve(uris: list[str], manifest: str) -> list[str]:
    """Relative entries resolved against the manifest's folder; others as given."""
    proto, path = fsspec.core.split_protocol(manifest)
    if is_local(manifest):
        base = os.path.dirname(os.path.abspath(path))
        return [u if _absolute(u) else os.path.normpath(os.path.join(base, u)) for u in uris]
    base = posixpath.dirname(path)
    return [u if _absolute(u) else f"{proto}://{posixpath.normpath(posixpath.join(base, u))}" for u in uris]


def _absolute(uri: str) -> bool:
    return "://" in uri or uri.startswith(("/", "~")) or "::" in uri


def _images(uris: list[str]) -> list[str]:
    return [u for u in uris if os.path.splitext(u)[1].lower() in IMAGE_EXTENSIONS]


def _extensions() -> str:
    return "looked for " + ", ".join(sorted(IMAGE_EXTENSIONS))
