"""S3 Inventory reports as SOURCE (issue 18): a report laid out as S3 writes it (manifest.json
plus gzipped CSV, ORC or Parquet data files in a destination bucket), written to moto's S3 here,
over a source bucket of real photographs whose keys have spaces, '+' and non-ASCII letters.

The report lists object versions: an older version of one key and a deleted key (its delete
marker the latest version) must not become images; a notes file is not an image either.
"""

from __future__ import annotations

import gzip
import io
import json
from urllib.parse import quote_plus

import pyarrow as pa
import pyarrow.orc as paorc
import pyarrow.parquet as pq
import pytest
from PIL import Image
from skimage import data as skdata

from segbatch.storage import SourceError, Storage, list_sources
from segbatch.storage.inventory import InventoryError, read_inventory

from s3util import S3Bucket, new_bucket

IMAGES = {  # key -> photograph
    "shelves/aisle 1/astronaut.jpg": skdata.astronaut,
    "shelves/a+b/coffee.jpg": skdata.coffee,
    "shelves/café/chelsea.jpg": skdata.chelsea,
}
# (key, is_latest, is_delete_marker) beyond the images: not images, or not current
OTHERS = [
    ("shelves/notes.txt", True, False),
    ("shelves/old/rocket.jpg", False, False),  # an older version, then deleted:
    ("shelves/old/rocket.jpg", True, True),  # its delete marker is the latest version
]
CSV_SCHEMA = "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size"


def _jpeg(photo) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(photo()[::4, ::4]).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _rows(bucket: str) -> list[tuple[str, str, str, bool, bool, int]]:
    rows = [(bucket, k, "v1", True, False, 1000) for k in IMAGES]
    rows += [(bucket, k, f"v{i}", latest, marker, 10) for i, (k, latest, marker) in enumerate(OTHERS)]
    return rows


def _data_file(fmt: str, rows: list[tuple]) -> bytes:
    """One data file as S3 Inventory writes it in ``fmt``."""
    if fmt == "CSV":  # no header, keys URL-encoded, gzipped
        lines = [
            ",".join(f'"{v}"' for v in (b, quote_plus(k, safe="/"), ver, str(lat).lower(), str(dm).lower(), size))
            for b, k, ver, lat, dm, size in rows
        ]
        return gzip.compress(("\n".join(lines) + "\n").encode())
    columns = ["bucket", "key", "version_id", "is_latest", "is_delete_marker", "size"]
    table = pa.table({c: [r[i] for r in rows] for i, c in enumerate(columns)})
    buf = io.BytesIO()
    (paorc.write_table if fmt == "ORC" else pq.write_table)(table, buf)
    return buf.getvalue()


def write_inventory(source: S3Bucket, inventory: S3Bucket, fmt: str, files: int = 2) -> str:
    """The report of ``source`` in ``inventory``, its rows over ``files`` data files; returns the manifest URL."""
    rows = _rows(source.bucket)
    root = f"reports/{source.bucket}/daily-{fmt.lower()}"
    keys = []
    for i in range(files):
        key = f"{root}/data/part-{i}.{ {'CSV': 'csv.gz', 'ORC': 'orc', 'Parquet': 'parquet'}[fmt] }"
        inventory.put(key, _data_file(fmt, rows[i::files]))
        keys.append({"key": key, "size": 1, "MD5checksum": "0"})
    manifest = {
        "sourceBucket": source.bucket,
        "destinationBucket": f"arn:aws:s3:::{inventory.bucket}",
        "version": "2016-11-30",
        "creationTimestamp": "1764550800000",
        "fileFormat": fmt,
        "fileSchema": CSV_SCHEMA if fmt == "CSV" else "message s3.inventory { required binary key (UTF8); }",
        "files": keys,
    }
    return inventory.put(f"{root}/2026-12-01T01-00Z/manifest.json", json.dumps(manifest).encode())


@pytest.fixture(scope="module")
def buckets(s3_server: str):
    source = new_bucket(s3_server, "inventory-source")
    for key, photo in IMAGES.items():
        source.put(key, _jpeg(photo))
    source.put("shelves/notes.txt", b"not an image")
    return source, new_bucket(s3_server, "inventory-reports")


@pytest.mark.parametrize("fmt", ["CSV", "ORC", "Parquet"])
def test_each_format_lists_the_current_images_with_their_keys_decoded(buckets, fmt) -> None:
    source, inventory = buckets
    manifest = write_inventory(source, inventory, fmt)
    storage = Storage(inventory.storage_options)
    uris = list_sources(manifest, storage)
    assert uris == sorted(source.url(k) for k in IMAGES)
    # every URI names its object: read back through segbatch's storage
    assert all(storage.read_bytes(u)[:2] == b"\xff\xd8" for u in uris)
    # the raw listing keeps the notes file (not an image) but no old version or delete marker
    assert sorted(read_inventory(manifest, storage)) == sorted([*uris, source.url("shelves/notes.txt")])


def test_a_missing_data_file_and_a_manifest_of_another_kind_are_usage_errors(buckets) -> None:
    source, inventory = buckets
    storage = Storage(inventory.storage_options)
    manifest = write_inventory(source, inventory, "Parquet", files=1)
    doc = json.loads(inventory.get(manifest.split("/", 3)[3]))
    doc["files"].append({"key": "reports/gone.parquet", "size": 1, "MD5checksum": "0"})
    broken = inventory.put("reports/broken/manifest.json", json.dumps(doc).encode())
    with pytest.raises(InventoryError, match="lists a data file that is missing: s3://.*gone.parquet"):
        list_sources(broken, storage)
    other = inventory.put("reports/avro/manifest.json", json.dumps({**doc, "fileFormat": "Avro"}).encode())
    with pytest.raises(InventoryError, match="format 'Avro'; segbatch reads CSV, ORC, Parquet"):
        list_sources(other, storage)
    only_notes = inventory.put(
        "reports/notes.parquet", _data_file("Parquet", [(source.bucket, "a.txt", "", True, False, 1)])
    )
    empty = {**doc, "files": [{"key": only_notes.split("/", 3)[3]}]}
    with pytest.raises(SourceError, match="lists no images"):
        list_sources(inventory.put("reports/empty/manifest.json", json.dumps(empty).encode()), storage)


@pytest.mark.slow
def test_a_job_over_an_inventory_segments_each_image_once_and_resumes(buckets, ray_local, tmp_path) -> None:
    from runutil import FAST_MODEL

    from segbatch.config import JobConfig, ModelConfig
    from segbatch.engine import run_job

    source, inventory = buckets
    manifest = write_inventory(source, inventory, "CSV", files=3)

    def job():
        cfg = JobConfig(
            source=manifest,
            dest=str(tmp_path / "dest"),
            storage_options=inventory.storage_options,  # one endpoint and key for both buckets
            shard_size=2,
            workers=1,
            cpus_per_worker=1,
            model=ModelConfig(**FAST_MODEL),
            progress="none",
        )
        return run_job(cfg)

    first = job()
    assert first.complete and first.summary.images_this_run == len(IMAGES)
    rows = pq.read_table(tmp_path / "dest" / "data").to_pylist()
    assert sorted(r["uri"] for r in rows) == sorted(source.url(k) for k in IMAGES)
    assert all(r["status"] == "ok" and r["width"] > 0 for r in rows)
    again = job()
    assert again.complete and again.summary.images_this_run == 0
    assert len(pq.read_table(tmp_path / "dest" / "data")) == len(IMAGES)
