"""SOURCE forms: folders, globs, URL prefixes and manifests, locally and on S3."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from s3util import S3Bucket
from segbatch.sources import SourceError, list_sources
from segbatch.storage import Storage


IMAGES = ["a.jpg", "b.JPEG", "sub/c.png", "sub/deeper/d.tiff", "sub/deeper/e.webp", "f.bmp", "g.tif"]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A folder of images at several depths, with files that are not images."""
    root = tmp_path / "images"
    for rel in IMAGES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"img")
    for rel in ["notes.txt", "sub/readme.md", "sub/deeper/anim.gif", "noext"]:
        (root / rel).write_bytes(b"other")
    return root


def test_folder_is_recursive_and_keeps_images(tree: Path):
    expected = sorted(str(tree / r) for r in IMAGES)
    assert list_sources(str(tree), Storage()) == expected
    assert list_sources(f"file://{tree}/", Storage()) == expected  # plain absolute paths back


def test_glob(tree: Path):
    st = Storage()
    assert list_sources(f"{tree}/*.jpg", st) == [str(tree / "a.jpg")]
    assert list_sources(f"{tree}/**/*.png", st) == [str(tree / "sub/c.png")]
    with pytest.raises(SourceError, match="no images found"):
        list_sources(f"{tree}/*.gif", st)


def test_s3_prefix_and_glob(s3: S3Bucket):
    for key in ["p/a.jpg", "p/x/b.png", "p/x/c.txt", "other/d.jpg"]:
        s3.put(key, b"img")
    st = Storage(s3.storage_options)
    assert list_sources(s3.url("p/"), st) == [s3.url("p/a.jpg"), s3.url("p/x/b.png")]
    assert list_sources(s3.url("p"), st) == [s3.url("p/a.jpg"), s3.url("p/x/b.png")]
    assert list_sources(s3.url("p/**/*.png"), st) == [s3.url("p/x/b.png")]
    with pytest.raises(SourceError, match="does not exist"):
        list_sources(s3.url("nothing/"), st)


def test_txt_manifest(tree: Path):
    manifest = tree / "lists" / "m.txt"
    manifest.parent.mkdir()
    manifest.write_text(
        "# images for tonight\n"
        "../a.jpg\n"
        "\n"
        f"  {tree / 'sub/c.png'}  \n"
        "s3://bucket/remote.jpg\n"
        "../a.jpg\n"  # duplicate
        "../missing.jpg\n"  # kept: it becomes an error row later
        "   # indented comment\n"
    )
    assert list_sources(str(manifest), Storage()) == sorted(
        [str(tree / "a.jpg"), str(tree / "sub/c.png"), "s3://bucket/remote.jpg", str(tree / "missing.jpg")]
    )


def test_csv_and_parquet_manifests(tree: Path):
    (tree / "m.csv").write_text("id,uri,label\n1,a.jpg,x\n2,sub/c.png,y\n3,s3://b/k.jpg,z\n")
    expected = sorted([str(tree / "a.jpg"), str(tree / "sub/c.png"), "s3://b/k.jpg"])
    assert list_sources(str(tree / "m.csv"), Storage()) == expected
    pq.write_table(pa.table({"uri": ["sub/c.png", "a.jpg", "s3://b/k.jpg", None], "n": [1, 2, 3, 4]}), tree / "m.parquet")
    assert list_sources(str(tree / "m.parquet"), Storage()) == expected


def test_manifest_on_s3_resolves_against_its_folder(s3: S3Bucket):
    s3.put("lists/m.txt", b"imgs/a.jpg\n../top.png\ns3://other/x.jpg\n")
    st = Storage(s3.storage_options)
    assert list_sources(s3.url("lists/m.txt"), st) == sorted(
        [s3.url("lists/imgs/a.jpg"), s3.url("top.png"), "s3://other/x.jpg"]
    )


def test_missing_source(tmp_path: Path):
    for missing in [str(tmp_path / "nope"), str(tmp_path / "nope.txt"), str(tmp_path / "nope.parquet")]:
        with pytest.raises(SourceError) as err:
            list_sources(missing, Storage())
        assert missing in str(err.value) and "does not exist" in str(err.value)
        assert "manifest" in str(err.value) and "glob" in str(err.value)  # says what is accepted


def test_empty_sources(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.pdf").write_bytes(b"%PDF")
    (tmp_path / "m.txt").write_text("# nothing yet\n\n")
    for source in ["empty", "docs", "m.txt"]:
        with pytest.raises(SourceError, match="no images found under"):
            list_sources(str(tmp_path / source), Storage())


def test_manifest_without_uri_column(tmp_path: Path):
    (tmp_path / "m.csv").write_text("path,label\na.jpg,x\n")
    with pytest.raises(SourceError, match=r"no 'uri' column.*'path', 'label'"):
        list_sources(str(tmp_path / "m.csv"), Storage())
    pq.write_table(pa.table({"file": ["a.jpg"]}), tmp_path / "m.parquet")
    with pytest.raises(SourceError, match=r"no 'uri' column.*'file'"):
        list_sources(str(tmp_path / "m.parquet"), Storage())
