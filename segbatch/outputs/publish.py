"""Publishing a DEST as an Iceberg table, so analysts query every night's rows as one
table (DuckDB, Trino, Spark, Snowflake) with a snapshot per publish.

The committed Parquet files under ``DEST/data`` are registered as they are
(pyiceberg's ``add_files``): nothing is copied or rewritten, the table's
metadata points at DEST's files. Each file is registered once: publishing
again, or after a later run added shards to DEST, adds only the files the
table does not hold yet. The table (``schema.SCHEMA``, unpartitioned) is
created on the first publish.

A registered file must then never change: Iceberg keeps its row count and
column statistics. A DEST that was cleared and run again (same names, other
bytes), or whose files were deleted, is refused with the fix, rather than
leaving a table whose scans fail or miscount.

Reads DEST through ``schema`` and ``Storage`` only, never the engine's
internals: ``DEST/data`` holds only committed shards (and merged scenes).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from segbatch import schema
from segbatch.errors import UsageError
from segbatch.redact import redact
from segbatch.storage import Storage, join, normalized

if TYPE_CHECKING:  # pyiceberg is an optional extra (``pip install segbatch[iceberg]``)
    from pyiceberg.catalog import Catalog
    from pyiceberg.table import Table

# The results files of DEST/data: one per committed shard, one per merged scene.
_RESULT_FILE = re.compile(r"^(part-\d+|scene-[0-9a-f]+)\.parquet$")
COMMIT_ATTEMPTS = 5  # another publish into the same table may commit between our read and our commit


class PublishError(UsageError, ValueError):
    """DEST cannot be published into the table as asked; the message names the fix."""


@dataclass(frozen=True)
class TableRef:
    """Where to publish: a catalog (None: pyiceberg's default one) and the table's
    identifier in it (namespace parts, then the table's name)."""

    catalog: str | None
    identifier: tuple[str, ...]

    @property
    def name(self) -> str:
        return ".".join(self.identifier)


@dataclass(frozen=True)
class PublishResult:
    """What a publish did: the files registered now, those the table already held,
    and the rows."""

    table: str  # the table's identifier, as ``namespace.table``
    added: tuple[str, ...]  # DEST's files registered by this publish
    skipped: tuple[str, ...]  # DEST's files the table held already
    rows_added: int
    table_rows: int  # every row of the table after the publish (all DESTs published into it)
    snapshot_id: int | None  # the snapshot this publish made; None when there was nothing to add
    created: bool  # whether this publish created the table


@dataclass(frozen=True)
class DestFile:
    """One of DEST's result files to register: its URL (``normalized``: as the table
    will hold it), rows, and segbatch's metadata of it (model, result key)."""

    url: str
    rows: int
    metadata: dict[str, Any]


def parse_table_ref(text: str) -> TableRef:
    """``CATALOG.NAMESPACE.TABLE`` (the spelling of Spark and Trino) or ``NAMESPACE.TABLE``
    in pyiceberg's default catalog (``default``, or ``PYICEBERG_DEFAULT_CATALOG``)."""
    parts = tuple(text.split("."))
    if len(parts) < 2 or not all(parts):
        raise PublishError(
            f"--iceberg {text!r} names no table: give NAMESPACE.TABLE (in the default catalog) "
            "or CATALOG.NAMESPACE.TABLE, e.g. 'lake.retail.shelf_segments'"
        )
    if len(parts) == 2:
        return TableRef(None, parts)
    return TableRef(parts[0], parts[1:])


def fileio_properties(storage_options: Mapping[str, Any] | None) -> dict[str, str]:
    """pyiceberg's S3 FileIO properties for the fsspec (s3fs) storage options DEST is
    read with, so that one ``--storage-options`` reaches DEST for segbatch and for
    pyiceberg alike (pyiceberg reads each file's footer when registering it, and
    every scan reads the files). They go over the catalog's configured properties
    (DEST must be read where the job wrote it); properties given explicitly
    (``--catalog-property``) go over them. s3fs options only: other stores take
    pyiceberg's own properties (``gcs.*``, ``adls.*``)."""
    opts = dict(storage_options or {})
    client = dict(opts.get("client_kwargs") or {})
    pairs = {
        "s3.endpoint": opts.get("endpoint_url") or client.get("endpoint_url"),
        "s3.access-key-id": opts.get("key") or opts.get("aws_access_key_id"),
        "s3.secret-access-key": opts.get("secret") or opts.get("aws_secret_access_key"),
        "s3.session-token": opts.get("token") or opts.get("aws_session_token"),
        "s3.region": client.get("region_name") or opts.get("region_name"),
        "s3.anonymous": "true" if opts.get("anon") else None,
    }
    return {k: str(v) for k, v in pairs.items() if v}


def open_catalog(name: str | None, properties: Mapping[str, str] | None = None) -> Catalog:
    """The catalog named ``name`` the pyiceberg way (``~/.pyiceberg.yaml``,
    ``PYICEBERG_CATALOG__<NAME>__<PROPERTY>``), with ``properties`` over its configuration:
    ``uri`` (``sqlite:///...``, ``postgresql://...``, ``http(s)://`` for REST, ``thrift://`` for
    Hive), ``warehouse``, ``type`` (``glue``, ...), ``s3.endpoint``, ..."""
    try:
        from pyiceberg.catalog import load_catalog
    except ImportError as exc:
        raise PublishError(f"publishing needs pyiceberg ({exc}): pip install 'segbatch[iceberg]'") from None
    try:
        return load_catalog(name, **dict(properties or {}))
    except ValueError as exc:  # pyiceberg names the missing property (uri, warehouse) and its variable
        raise PublishError(f"cannot open the Iceberg catalog {name or 'default'!r}: {exc}") from None


def dest_files(dest: str, storage: Storage) -> list[str]:
    """The URLs of DEST's committed result files (``part-*``, ``scene-*``), sorted."""
    data = join(dest, schema.DATA)
    if not storage.exists(data):
        raise PublishError(f"{dest} holds no results (no data/ folder); run `segbatch run SOURCE {dest}` first")
    folder = normalized(data)
    return [
        url
        for url in storage.list_files(data)  # recursive: only the files right in data/ are results
        if posixpath.dirname(normalized(url)) == folder and _RESULT_FILE.match(posixpath.basename(url))
    ]


def describe(url: str, storage: Storage) -> DestFile:
    """A result file's rows and metadata, from its footer alone.

    A file whose columns are not ``schema.SCHEMA`` (another tool's, or another
    segbatch version's) is refused by name: the table's columns are SCHEMA's."""
    footer = storage.read_parquet_metadata(url)
    arrow = footer.schema.to_arrow_schema()
    if not arrow.equals(schema.SCHEMA, check_metadata=False):
        raise PublishError(
            f"{url} does not have this segbatch's columns (schema version {schema.SCHEMA_VERSION}); "
            "publish only DESTs written by this segbatch version, or run the job again into a new DEST"
        )
    return DestFile(normalized(url), footer.num_rows, schema.read_metadata(arrow))


def table_files(table: Table) -> dict[str, tuple[int, int]]:
    """The table's current data files: normalized path -> (bytes, rows)."""
    return {
        normalized(task.file.file_path): (task.file.file_size_in_bytes, task.file.record_count)
        for task in table.scan().plan_files()
    }


def check_unchanged(dest: str, sizes: Mapping[str, int], registered: Mapping[str, tuple[int, int]]) -> None:
    """Refuse a DEST whose files the table holds but that changed or vanished since
    (``sizes``: DEST's files now, normalized URL -> bytes): Iceberg keeps each file's
    row count and statistics, so scans would miscount or fail."""
    prefix = normalized(join(dest, schema.DATA)) + "/"
    changed = [u for u, (size, _) in registered.items() if u in sizes and sizes[u] != size]
    gone = [u for u in registered if u.startswith(prefix) and u not in sizes]
    if changed or gone:
        what = f"{len(changed)} changed" if changed else f"{len(gone)} gone"
        raise PublishError(
            f"the table holds files of {dest} that are {what} since they were published "
            f"(e.g. {(changed or gone)[0]}): DEST was cleared or rewritten after publishing. Publish it into "
            "a new table, or remove those files from the table first (a registered file must never change)"
        )


def snapshot_properties(dest: str, added: list[DestFile]) -> dict[str, str]:
    """What the publish's snapshot says about its rows: which DEST, model and result key."""
    keys = sorted({f.metadata.get("result_key", "") for f in added} - {""})
    models = sorted({f.metadata.get("model_id", "") for f in added} - {""})
    return {
        "segbatch.dest": redact(dest),  # a URL may carry a password or a presigned query
        "segbatch.files": str(len(added)),
        "segbatch.result-keys": ",".join(keys),
        "segbatch.models": ",".join(models),
    }


def load_or_create(catalog: Catalog, ref: TableRef) -> tuple[Table, bool]:
    """The table, created (with its namespace) from ``schema.SCHEMA`` when it does not exist."""
    from pyiceberg.exceptions import NoSuchTableError

    try:
        return catalog.load_table(ref.identifier), False
    except NoSuchTableError:
        pass
    catalog.create_namespace_if_not_exists(ref.identifier[:-1])
    table = catalog.create_table_if_not_exists(ref.identifier, schema=schema.SCHEMA)
    return table, True


def publish(dest: str, storage: Storage, catalog: Catalog, ref: TableRef) -> PublishResult:
    """Register DEST's committed files that the table does not hold yet (creating the table
    on first use), in one snapshot. Publishing the same DEST again adds nothing.

    Another publish into the same table may commit first: the table is then read
    again and only what is still missing is added (``COMMIT_ATTEMPTS`` times)."""
    from pyiceberg.exceptions import CommitFailedException

    urls = {normalized(u): u for u in dest_files(dest, storage)}
    sizes = {key: storage.size(url) for key, url in urls.items()}
    described: dict[str, DestFile] = {}  # footers read once, across commit attempts
    table, created = load_or_create(catalog, ref)
    for attempt in range(COMMIT_ATTEMPTS):
        registered = table_files(table)
        check_unchanged(dest, sizes, registered)
        skipped = tuple(u for u in urls if u in registered)
        for u in urls.keys() - registered.keys() - described.keys():
            described[u] = describe(urls[u], storage)
        new = [described[u] for u in urls if u not in registered]
        if not new:
            return PublishResult(ref.name, (), skipped, 0, _table_rows(table), None, created)
        try:
            table.add_files([f.url for f in new], snapshot_properties=snapshot_properties(dest, new))
        except CommitFailedException:
            if attempt == COMMIT_ATTEMPTS - 1:
                raise
            table = catalog.load_table(ref.identifier)
            continue
        except (ValueError, TypeError) as exc:  # pyiceberg's schema check: the table's columns are not SCHEMA's
            raise PublishError(
                f"cannot add {dest}'s files to {ref.name}: {exc}; publish into a table segbatch created "
                "(a new name creates one)"
            ) from None
        snapshot = table.current_snapshot()
        return PublishResult(
            table=ref.name,
            added=tuple(f.url for f in new),
            skipped=skipped,
            rows_added=sum(f.rows for f in new),
            table_rows=_table_rows(table),
            snapshot_id=snapshot.snapshot_id if snapshot else None,
            created=created,
        )
    raise AssertionError("unreachable: the last attempt returns or raises")


def _table_rows(table: Table) -> int:
    """The table's rows, from its current snapshot's summary (no file is read)."""
    snapshot = table.current_snapshot()
    if snapshot is None or snapshot.summary is None:
        return 0
    return int(snapshot.summary.get("total-records", 0))
