"""Listing a prefix of an object store fanned out over its sub-prefixes (issue 18): the same
files as one flat listing (boto3's paginated ``list_objects_v2``, the reference), on moto's S3.

The layout has what fan-out must not lose or double: files beside sub-prefixes at every level,
one prefix past a page of 1000 keys, prefixes deeper than the fan-out goes, names with spaces,
'+' and non-ASCII letters, a "folder" marker key, and a name that is the prefix of another.
"""

from __future__ import annotations

import pytest

from segbatch.storage import Storage, files

from s3util import S3Bucket

KEYS = (
    ["top.jpg", "arch/a.jpg", "arch/aisle 1/x+y.jpg", "arch/café/é.png", "arch/b/", "arch/b/c/d/e/f/deep.jpg"]
    + [f"arch/big/{i:05d}.jpg" for i in range(1100)]  # two pages of a flat listing
    + [f"arch/y{y}/m{m:02d}/{i}.jpg" for y in (2025, 2026) for m in range(1, 13) for i in range(3)]
    + ["arch2/not-under-arch.jpg", "archive.txt", "arch/empty/"]  # share the prefix's letters, not its folder
)


@pytest.fixture(scope="module")
def bucket(s3_server: str) -> S3Bucket:
    from s3util import new_bucket

    b = new_bucket(s3_server, "listing")
    for key in KEYS:
        b.client.put_object(Bucket=b.bucket, Key=key, Body=b"x")
    return b


@pytest.mark.parametrize("width, depth", [(16, 3), (1, 3), (4, 1), (64, 5)])
def test_a_fanned_out_listing_is_the_flat_listing(bucket, monkeypatch, width, depth) -> None:
    monkeypatch.setattr(files, "LIST_WIDTH", width)
    monkeypatch.setattr(files, "LIST_DEPTH", depth)
    storage = Storage(bucket.storage_options)
    for prefix in ("arch/", "arch", ""):
        # every key, the folder marker too (as fsspec's flat find gives it; not an image, so never planned)
        expected = sorted(bucket.url(k) for k in bucket.keys(prefix.rstrip("/") + "/" if prefix else ""))
        assert storage.list_files(bucket.url(prefix)) == expected, prefix


def test_a_missing_prefix_lists_nothing_and_a_file_lists_itself(bucket) -> None:
    storage = Storage(bucket.storage_options)
    assert storage.list_files(bucket.url("nothing/here/")) == []
    assert storage.list_files(bucket.url("arch/a.jpg")) == [bucket.url("arch/a.jpg")]
