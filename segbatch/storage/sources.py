"""SOURCE to a sorted list of image URIs: folders, globs, URL prefixes, manifests,
S3 Inventory reports (``inventory.py``); a STAC document is ``stac.py``'s, read
by the driver before these.

Every object listed gets its URI, whatever bytes its name holds: a local
name that is not UTF-8 becomes a ``file://`` URI by ``storage.local_uri``
(the one rule), which Storage reads back by the same URI.

Nothing segbatch writes is ever planned as input (``outputs_in``): DEST and
``--semantic-out`` are left out of the listing wherever they lie, so a
nightly job whose DEST is under its SOURCE does not segment its own class
maps and overlays on the next run.
"""

from __future__ import annotations

import itertools
import logging
import os
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec.core
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from segbatch.errors import UsageError
from segbatch.schema import DATA, META, OBJECTS

from .files import Storage
from .inventory import iter_inventory, read_inventory
from .urls import is_local, is_utf8, join, local_uri, normalized, percent_escaped

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp"})
MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet")
ACCEPTED = (
    "SOURCE can be a folder (searched recursively), a glob (/data/*.jpg, s3://bucket/p/**/*.png), "
    "a URL prefix (s3://bucket/prefix/, gs://..., file://...), or a manifest "
    "(.txt with one URI a line, or .csv/.parquet with a 'uri' column), "
    "an S3 Inventory report (its manifest.json), "
    "or a STAC Item, ItemCollection, Collection or Catalog (.json or an http(s) URL)"
)
_GLOB_CHARS = frozenset("*?[")
# what segbatch writes into DEST: its records, results, scene objects, and render's default output folder
DEST_OUTPUTS = (META, DATA, OBJECTS, "_render")


CHUNK_URIS = 65_536  # URIs a streamed listing hands the planner at a time


class SourceError(UsageError, ValueError):
    """SOURCE cannot be turned into a list of images."""


@dataclass
class Listing:
    """SOURCE's URIs (as ``list_sources`` gives them) a chunk at a time, so the
    driver plans an archive without holding it: in the listing's order (the
    planner sorts each chunk; sorted among themselves, each meets a part or two
    of a plan being extended).

    ``estimate``: at most this many, where known before listing (a manifest's rows).
    """

    source: str
    chunks: Iterator[list[str]]
    estimate: int | None

    @classmethod
    def of(cls, source: str, uris: list[str]) -> Listing:
        """URIs listed whole (a folder's, a STAC catalog's, a tiled job's tiles), sorted and de-duplicated."""
        ordered = sorted_unique(uris)
        chunks = (ordered[i : i + CHUNK_URIS] for i in range(0, len(ordered), CHUNK_URIS))
        return cls(source, chunks, len(ordered))


def sorted_unique(uris: list[str]) -> list[str]:
    # list_sources already returns them so: checking is a tenth of sorting a million again
    if all(a < b for a, b in zip(uris, uris[1:])):
        return list(uris)
    return sorted(set(uris))


def stream_sources(
    source: str, storage: Storage, *, dest: str | None = None, semantic_out: str | None = None
) -> Listing:
    """``list_sources`` as a ``Listing``. Streamed: an S3 prefix in key order,
    its sub-prefixes listed several at once (``Storage.list_pages``); an S3
    Inventory, a data file at a time; a Parquet manifest in sorted order whose
    URIs are absolute, a row group at a time (checked in a first pass over its
    column). Any other SOURCE is listed whole first."""
    if source.lower().endswith(".parquet") and (rows := _sorted_parquet_rows(source, storage)) is not None:
        log.info("%s: a sorted manifest of %d URIs, planned as it is read", source, rows)
        return Listing(source, _parquet_chunks(source, storage, outputs_in(source, dest, semantic_out)), rows)
    plain = not any(c in _GLOB_CHARS for c in source) and not source.lower().endswith(MANIFEST_SUFFIXES)
    if plain and source.lower().endswith(".json"):  # not STAC (the driver reads that first): an S3 Inventory
        chunks = _image_chunks(iter_inventory(source, storage), outputs_in(source, dest, semantic_out))
        first = next(chunks, None)
        if first is None:
            raise SourceError(f"the S3 Inventory {source} lists no images ({_extensions()})")
        return Listing(source, itertools.chain([first], chunks), None)
    if plain and (pages := storage.list_pages(source)) is not None:
        chunks = _image_chunks(pages, outputs_in(source, dest, semantic_out))
        first = next(chunks, None)  # here, not in the planner: a listing refused at once is told as before
        if first is not None:
            log.info("%s: planned as it is listed", source)
            return Listing(source, itertools.chain([first], chunks), None)
        # no image in the whole listing: list_sources says why (no such prefix, no images, only outputs)
    return Listing.of(source, list_sources(source, storage, dest=dest, semantic_out=semantic_out))


def _image_chunks(pages: Iterator[list[str]], outputs: list[str]) -> Iterator[list[str]]:
    """The images (by extension, less segbatch's outputs) of a listing's pages, in their order,
    ``CHUNK_URIS`` at a time."""
    chunk: list[str] = []
    for page in pages:
        uris = _images(page)
        chunk += _left_out(uris, outputs) if outputs and uris else uris
        if len(chunk) >= CHUNK_URIS:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _parquet_batches(source: str, storage: Storage) -> Iterator[pa.Array]:
    """The 'uri' column of a Parquet manifest, a batch at a time (raises when it has none)."""
    with storage.open(source) as f:
        manifest = pq.ParquetFile(f)
        column = _uri_column(manifest.schema_arrow.names, source)
        for batch in manifest.iter_batches(batch_size=CHUNK_URIS, columns=[column]):
            yield batch.column(0)


def _sorted_parquet_rows(source: str, storage: Storage) -> int | None:
    """The row count of a Parquet manifest that can be streamed: a text 'uri'
    column, every entry absolute and without surrounding blanks, in sorted
    order. None for any other (a folder so named, bytes, relative entries, any
    order): ``list_sources`` reads it whole, as it always has."""
    try:
        if storage.isdir(source):
            return None
        rows, last = 0, None
        for arr in _parquet_batches(source, storage):
            if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)) or arr.null_count:
                return None
            if len(arr) and not pc.all(pc.match_substring_regex(arr, r"^(/|[A-Za-z][\w+.-]*://)\S(.*\S)?$")).as_py():
                return None
            if len(arr) > 1 and not pc.all(pc.less_equal(arr[:-1], arr[1:])).as_py():
                return None
            if len(arr) and last is not None and arr[0].as_py() < last:
                return None
            rows += len(arr)
            last = arr[-1].as_py() if len(arr) else last
        return rows
    except (pa.ArrowInvalid, OSError, SourceError):
        return None  # list_sources says what is wrong with it


def _parquet_chunks(source: str, storage: Storage, outputs: list[str]) -> Iterator[list[str]]:
    """A sorted manifest's URIs, a batch at a time: repeats dropped, segbatch's outputs left out
    (a manifest of nothing else is refused once read, as ``list_sources`` refuses it)."""
    last, kept = None, 0
    for arr in _parquet_batches(source, storage):
        uris = arr.to_pylist()
        # sorted: a repeat is next to the first of it
        uris = [u for i, u in enumerate(uris) if u != (uris[i - 1] if i else last)]
        last = arr[-1].as_py() if len(arr) else last
        uris = _left_out(uris, outputs) if outputs and uris else uris
        kept += len(uris)
        yield uris
    if not kept:
        raise SourceError(f"no images found under {source} but segbatch's own outputs ({', '.join(outputs)})")


def list_sources(
    source: str, storage: Storage, *, dest: str | None = None, semantic_out: str | None = None
) -> list[str]:
    """The URIs SOURCE names, sorted and de-duplicated, less what segbatch
    writes (``outputs_in``: DEST's and ``semantic_out``'s files are never input).

    Folders, prefixes, globs and inventories keep image files only (by extension);
    manifests keep every URI as given, so a bad one becomes an error row.
    """
    outputs = outputs_in(source, dest, semantic_out)
    if any(c in _GLOB_CHARS for c in source):
        uris = _images(storage.glob(source))
        if not uris:
            raise SourceError(f"no images found matching {source} ({_extensions()})")
    elif source.lower().endswith(MANIFEST_SUFFIXES):
        uris = _manifest_or_folder(source, storage)
    elif source.lower().endswith(".json"):  # not STAC (the driver reads that first): an S3 Inventory report
        uris = _images(read_inventory(source, storage))
        if not uris:
            raise SourceError(f"the S3 Inventory {source} lists no images ({_extensions()})")
    else:
        uris = _folder(source, storage)
    uris = sorted(set(uris))
    if outputs:
        kept = _left_out(uris, outputs)
        if len(kept) < len(uris):
            log.info("%d files left out: segbatch's own outputs (%s)", len(uris) - len(kept), ", ".join(outputs))
        if not kept:
            raise SourceError(f"no images found under {source} but segbatch's own outputs ({', '.join(outputs)})")
        uris = kept
    log.info("%d images in %s", len(uris), source)
    return uris


def outputs_in(source: str, dest: str | None, semantic_out: str | None) -> list[str]:
    """The folders (``normalized``) whose files are never input: DEST as a whole,
    or, when SOURCE lies inside DEST (``segbatch demo`` keeps its images
    there), only what segbatch writes into it (``DEST_OUTPUTS``); and the
    ``--semantic-out`` folder. Class maps go to the top of that folder, so
    it cannot be SOURCE's own folder."""
    root = normalized(_root(source))
    out = []
    if dest:
        if _within(root, normalized(dest)):
            out += [normalized(join(dest, name)) for name in DEST_OUTPUTS]
        else:
            out.append(normalized(dest))
    if semantic_out:
        folder = normalized(semantic_out)
        if folder == root:
            raise SourceError(
                f"--semantic-out {semantic_out} is SOURCE's own folder: the next run would read its class maps as "
                "images. Give a folder of its own (inside SOURCE or elsewhere)"
            )
        if not _within(root, folder):  # a SOURCE below it never reaches the class maps at its top
            out.append(folder)
    return out


def _root(source: str) -> str:
    """The folder SOURCE lists from: the folder itself, a glob's fixed part, a manifest's folder."""
    cut = min((source.index(c) for c in _GLOB_CHARS if c in source), default=None)
    if cut is not None:
        return source[:cut].rsplit("/", 1)[0] or "/"
    if source.lower().endswith(MANIFEST_SUFFIXES):
        return source.rsplit("/", 1)[0] if "/" in source else "."
    return source


def _left_out(uris: list[str], outputs: list[str]) -> list[str]:
    """``uris`` less those within a folder of ``outputs`` (``normalized``).

    A listing's URIs are in normal form already (absolute paths,
    ``proto://bucket/key``), so the prefixes are matched by Arrow over them
    all at once; only a URI in another form (``..``, ``//``, a relative or
    ``file://`` path, another name of the protocol) goes through ``normalized``.
    A million URIs in Python alone would add seconds to planning.
    """
    arr = pa.array(uris, pa.string())
    hit = pc.is_in(arr, value_set=pa.array(outputs, pa.string()))
    for o in outputs:
        hit = pc.or_(hit, pc.starts_with(arr, o.rstrip("/") + "/"))
    protocols = sorted({re.escape(o.split("://", 1)[0]) + "://" for o in outputs if "://" in o})
    normal = f"^(/|{'|'.join(protocols)})" if protocols else "^/"
    other = pc.or_(
        pc.invert(pc.match_substring_regex(arr, normal)),
        pc.match_substring_regex(arr, r"(^/|://).*//|/\.\.?(/|$)|/$"),
    )
    drop = hit.to_pylist()
    for i in pc.indices_nonzero(other).to_pylist():
        n = normalized(uris[i])
        drop[i] = any(_within(n, o) for o in outputs)
    return [u for u, d in zip(uris, drop) if not d]


def _within(url: str, folder: str) -> bool:
    """Whether normalized ``url`` is ``folder`` or under it (``out`` holds ``out/x``, not ``outdoor/x``)."""
    return url == folder or url.startswith(folder.rstrip("/") + "/")


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
    """The URIs of a manifest's bytes, relative ones resolved against its folder.

    A name need not be UTF-8 (a manifest written by ``find`` over an old
    archive): its bytes are kept (surrogate-escaped) and become a URI by
    ``storage.local_uri``'s rule (``_as_uri``).
    """
    suffix = source.lower().rsplit(".", 1)[-1]
    if suffix == "txt":
        # one entry a line, split on \n (and \r\n) only: str.splitlines would also split
        # a name on U+2028, U+0085, \x0b or \x0c, which file names may hold
        text = data.decode("utf-8-sig", errors="surrogateescape")
        lines = (line.strip(" \t\r") for line in text.split("\n"))
        uris = [line for line in lines if line and not line.startswith("#")]
    elif suffix == "csv":
        try:
            options = pacsv.ConvertOptions(column_types={"uri": pa.binary()})  # bytes: a name may not be UTF-8
            table = pacsv.read_csv(pa.BufferReader(data), convert_options=options)
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
    return [_as_uri(u) for u in _resolve(uris, source)]


def _as_uri(uri: str) -> str:
    """A manifest entry as a URI that is valid UTF-8: a local path by ``local_uri``;
    a URL by percent-escaping its undecodable bytes (object stores hold UTF-8
    keys only, so it names nothing there, and gets its "not found" row)."""
    if is_utf8(uri):
        return uri
    return local_uri(uri) if is_local(uri) else percent_escaped(uri)


def _uri_column(names: list[str], source: str) -> str:
    for name in names:
        if name.strip().lower() == "uri":
            return name
    columns = ", ".join(map(repr, names)) or "none"
    raise SourceError(f"manifest {source} has no 'uri' column; its columns are: {columns}")


def _column(table: pa.Table, name: str) -> list[str]:
    column = table.column(name)
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        values = [v.decode("utf-8", errors="surrogateescape") if v is not None else None for v in column.to_pylist()]
    else:
        values = column.cast(pa.string()).to_pylist()
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
