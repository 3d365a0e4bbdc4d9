"""An S3 Inventory report as SOURCE: the bucket owner's own list of its objects.

Listing a prefix of 100 million keys is some 100,000 sequential LIST requests;
owners of buckets that large enumerate them with S3 Inventory instead, a daily
or weekly report S3 writes to another bucket. SOURCE is then the report's
``manifest.json``::

    s3://inventory-bucket/PREFIX/SOURCE-BUCKET/CONFIG-ID/2026-12-01T01-00Z/manifest.json

which names the source bucket, the format of the data files (``CSV``, gzipped
and without a header, its columns in ``fileSchema``; ``ORC``; ``Parquet``) and
the data files themselves (``files[].key`` in the destination bucket). Each
data file is read with Arrow, only the columns needed; a report that lists
object versions keeps each key's latest version and drops delete markers.
CSV reports hold keys URL-encoded (form encoding: ``+`` is a space); ORC and
Parquet reports hold them as they are.

Layout and fields: https://docs.aws.amazon.com/AmazonS3/latest/userguide/storage-inventory.html
(manifest version 2016-11-30).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote_plus

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.orc as paorc
import pyarrow.parquet as pq

from segbatch.errors import UsageError

from .files import Storage
from .urls import protocol

log = logging.getLogger(__name__)

FORMATS = ("CSV", "ORC", "Parquet")
_MAX_MANIFEST_BYTES = 64 << 20  # a manifest names thousands of files at most: a few MB
_READ_THREADS = 16  # data files are read in parallel: each is one GET of tens of MB
# the columns read: ORC and Parquet reports name them so; CSV ones by fileSchema's names
_COLUMNS = ("key", "is_latest", "is_delete_marker")
_CSV_NAMES = {"Key": "key", "IsLatest": "is_latest", "IsDeleteMarker": "is_delete_marker"}


class InventoryError(UsageError, ValueError):
    """SOURCE names an S3 Inventory manifest that cannot be read; the message says why."""


def is_inventory_manifest(doc: Any) -> bool:
    """Whether a parsed JSON document is an S3 Inventory manifest (not STAC, not anything else)."""
    return isinstance(doc, dict) and {"sourceBucket", "fileFormat", "files"} <= doc.keys()


def read_inventory(source: str, storage: Storage) -> list[str]:
    """The ``s3://SOURCE-BUCKET/KEY`` URI of every current object the report lists, unsorted.

    source: the manifest's URL.
    """
    uris = [u for chunk in iter_inventory(source, storage) for u in chunk]
    log.info("S3 Inventory %s: %d objects", source, len(uris))
    return uris


def iter_inventory(source: str, storage: Storage) -> Iterator[list[str]]:
    """``read_inventory`` a data file at a time, in the manifest's order (``_READ_THREADS``
    files read at once): a report of 100 million objects is never held whole.

    The manifest is read and checked here, before the first data file is asked for.
    """
    try:
        doc = json.loads(storage.read_bytes(source, _MAX_MANIFEST_BYTES))
    except FileNotFoundError:
        raise InventoryError(f"SOURCE {source} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InventoryError(f"SOURCE {source} is not JSON ({exc})") from None
    if not is_inventory_manifest(doc):
        raise InventoryError(
            f"SOURCE {source} is not an S3 Inventory manifest (it needs sourceBucket, fileFormat and files)"
        )
    fmt = str(doc["fileFormat"])
    if fmt.upper() not in (f.upper() for f in FORMATS):
        raise InventoryError(f"the S3 Inventory {source} is in format {fmt!r}; segbatch reads {', '.join(FORMATS)}")
    bucket = str(doc["sourceBucket"])
    files = [data_file_url(source, doc, f["key"]) for f in doc["files"]]
    columns = csv_columns(doc.get("fileSchema", "")) if fmt.upper() == "CSV" else None
    log.info("S3 Inventory %s: s3://%s in %d %s files", source, bucket, len(files), fmt)

    def read(url: str) -> list[str]:
        try:
            data = storage.read_bytes(url)
        except FileNotFoundError:
            raise InventoryError(
                f"the S3 Inventory {source} lists a data file that is missing: {storage.redact(url)}"
            ) from None
        return [f"s3://{bucket}/{key}" for key in current_keys(read_data_file(data, fmt, columns, url))]

    def chunks() -> Iterator[list[str]]:
        with ThreadPoolExecutor(min(_READ_THREADS, max(1, len(files)))) as pool:
            for i in range(0, len(files), _READ_THREADS):
                yield from pool.map(read, files[i : i + _READ_THREADS])

    return chunks()


def data_file_url(manifest: str, doc: dict[str, Any], key: str) -> str:
    """Where a data file lies: ``files[].key`` in the destination bucket (an ARN, ``arn:aws:s3:::NAME``),
    on the manifest's own protocol (``s3``, or ``s3a``, ...)."""
    destination = str(doc.get("destinationBucket", ""))
    name = destination.rsplit(":", 1)[-1] if destination else manifest.split("://", 1)[-1].split("/", 1)[0]
    return f"{protocol(manifest) or 's3'}://{name}/{key}"


def csv_columns(file_schema: str) -> list[str]:
    """A CSV report's column names, in order, from its ``fileSchema`` ("Bucket, Key, Size, ...")."""
    columns = [c.strip() for c in str(file_schema).split(",") if c.strip()]
    if "Key" not in columns:
        raise InventoryError(f"the S3 Inventory's fileSchema has no Key column: {file_schema!r}")
    return columns


def read_data_file(data: bytes, fmt: str, csv_columns: list[str] | None, url: str) -> pa.Table:
    """One data file to a table of ``key`` (str, decoded) and, where the report has them,
    ``is_latest`` and ``is_delete_marker`` (bool)."""
    try:
        if fmt.upper() == "CSV":
            names = [_CSV_NAMES.get(c, c) for c in csv_columns or []]
            stream = pa.input_stream(pa.BufferReader(data), compression="gzip" if data[:2] == b"\x1f\x8b" else None)
            table = pacsv.read_csv(
                stream,
                read_options=pacsv.ReadOptions(column_names=names),
                convert_options=pacsv.ConvertOptions(
                    include_columns=[n for n in _COLUMNS if n in names],
                    column_types={"key": pa.string(), "is_latest": pa.bool_(), "is_delete_marker": pa.bool_()},
                ),
            )
            keys = pa.array([unquote_plus(k) for k in table.column("key").to_pylist()], pa.string())
            return table.set_column(table.schema.get_field_index("key"), "key", keys)
        if fmt.upper() == "ORC":
            orc = paorc.ORCFile(pa.BufferReader(data))
            return orc.read(columns=[c for c in _COLUMNS if c in orc.schema.names])
        names = pq.read_schema(pa.BufferReader(data)).names
        return pq.read_table(pa.BufferReader(data), columns=[c for c in _COLUMNS if c in names])
    except (pa.ArrowInvalid, OSError) as exc:
        raise InventoryError(f"the S3 Inventory data file {url} is not readable {fmt}: {exc}") from None


def current_keys(table: pa.Table) -> list[str]:
    """The keys of current objects: a versioned report's older versions and delete markers left out."""
    keep = pc.is_valid(table.column("key"))
    for name, wanted in (("is_latest", True), ("is_delete_marker", False)):
        if name in table.column_names:
            keep = pc.and_(keep, pc.fill_null(pc.equal(table.column(name), wanted), True))
    return table.column("key").filter(keep).to_pylist()
