"""SOURCE forms: folders, globs, URL prefixes and manifests, locally and on S3."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from segbatch.engine import JobStore
from segbatch.storage import SourceError, Storage, list_sources, local_path, local_uri

from s3util import S3Bucket

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
    pq.write_table(
        pa.table({"uri": ["sub/c.png", "a.jpg", "s3://b/k.jpg", None], "n": [1, 2, 3, 4]}), tree / "m.parquet"
    )
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


# -- names that are not UTF-8 ----------------------------------------------------------

RAW_NAMES = [b"caf\xe9.jpg", b"sub/p%\xff.png", b"sub/ok%20.jpg", b"\xe2\x80\xa8line.png", b"plain.jpg"]


@pytest.fixture
def raw_tree(tmp_path: Path) -> Path:
    """Files whose names are bytes that are not UTF-8 (old cameras, zip archives from Windows), beside ordinary ones."""
    root = tmp_path / "raw"
    (root / "sub").mkdir(parents=True)
    for i, name in enumerate(RAW_NAMES):
        with open(os.fsencode(root) + b"/" + name, "wb") as f:
            f.write(bytes([i]) * 3)
    return root


def test_names_that_are_not_utf8_are_listed_planned_and_read_back(raw_tree: Path, tmp_path: Path):
    """Every object listed gets a URI that is valid UTF-8 (planned into Parquet without a crash), losslessly
    (read back by the same URI), while names that are UTF-8 stay plain paths, ``%`` and U+2028 included."""
    st = Storage()
    uris = list_sources(str(raw_tree), st)
    root = os.fsencode(raw_tree)
    assert sorted(uris) == sorted(
        [
            f"file://{raw_tree}/caf%E9.jpg",  # RFC 8089: the byte percent-encoded
            f"file://{raw_tree}/sub/p%25%FF.png",  # and % itself, where the rule fires
            f"{raw_tree}/sub/ok%20.jpg",  # an ordinary name: as it is
            f"{raw_tree}/\u2028line.png",
            f"{raw_tree}/plain.jpg",
        ]
    )
    for uri in uris:
        name = next(n for n in RAW_NAMES if local_path(uri) == os.fsdecode(root + b"/" + n))
        assert st.read_bytes(uri) == bytes([RAW_NAMES.index(name)]) * 3
        assert st.exists(uri) and st.size(uri) == 3
    assert st.glob(f"{raw_tree}/*.jpg") == sorted(u for u in uris if u.endswith(".jpg") and "/sub/" not in u)

    store = JobStore(str(tmp_path / "dest"), st)
    store.write_plan(uris, 2)  # crashed with UnicodeEncodeError: pyarrow takes UTF-8 only
    shards, _ = store.read_plan()
    assert sorted(u for s in shards for u in s.uris) == sorted(uris)
    assert local_uri(local_path(f"file://{raw_tree}/caf%E9.jpg")) == f"file://{raw_tree}/caf%E9.jpg"
    assert local_path("file:///data/100%25.jpg") == "file:///data/100%25.jpg"  # UTF-8 once decoded: as typed


def test_txt_manifest_splits_on_newlines_only(tmp_path: Path):
    """A name may hold U+2028, U+0085, \\x0b or \\x0c (str.splitlines splits on them) or bytes that are not UTF-8."""
    names = ["a\u2028b.jpg", "c\x85d.jpg", "e\x0bf.jpg", "g\x0ch.jpg", "plain.jpg"]
    body = "\r\n".join(names).encode() + b"\n" + b"caf\xe9.jpg\n" + b"s3://bucket/k\xff.jpg\n"
    (tmp_path / "m.txt").write_bytes(body)
    got = list_sources(str(tmp_path / "m.txt"), Storage())
    assert got == sorted([str(tmp_path / n) for n in names] + [f"file://{tmp_path}/caf%E9.jpg", "s3://bucket/k%FF.jpg"])
    (tmp_path / "m.csv").write_bytes(b"uri,n\ncaf\xe9.jpg,1\nplain.jpg,2\n")
    assert list_sources(str(tmp_path / "m.csv"), Storage()) == sorted(
        [f"file://{tmp_path}/caf%E9.jpg", str(tmp_path / "plain.jpg")]
    )


# -- segbatch's outputs are never input ---------------------------------------------------


def test_outputs_are_never_listed_as_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """DEST and --semantic-out under SOURCE are left out, however they are spelled; DEST=out keeps outdoor/;
    a SOURCE inside DEST (segbatch demo's) keeps its images and loses only what segbatch writes."""
    src = tmp_path / "src"
    written = ["maps/a-1234abcd.png", "out/_render/z.png", "out/_segbatch/y.png", "out/data/x.png"]
    for rel in ["a.jpg", "outdoor/b.jpg", *written]:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(b"img")
    st = Storage()
    expected = [str(src / "a.jpg"), str(src / "outdoor/b.jpg")]
    monkeypatch.chdir(src)
    for dest, maps in [("out", "maps"), (f"{src}/out/", f"file://{src}/maps/"), ("./out", "./maps/")]:
        assert list_sources(str(src), st, dest=dest, semantic_out=maps) == expected
        assert list_sources(f"{src}/**/*.jpg", st, dest=dest, semantic_out=maps) == expected
        with pytest.raises(SourceError, match="but segbatch's own outputs"):
            list_sources(f"{src}/*/*/*.png", st, dest=dest, semantic_out=maps)
    assert list_sources(str(src), st) == sorted(expected + [str(src / r) for r in written])  # without: all listed
    # segbatch demo: SOURCE = DEST/_demo/images; DEST's own folders only are left out
    demo = tmp_path / "demo"
    (demo / "_demo" / "images").mkdir(parents=True)
    (demo / "_demo" / "images" / "s.png").write_bytes(b"img")
    assert list_sources(str(demo / "_demo" / "images"), st, dest=str(demo)) == [str(demo / "_demo/images/s.png")]
    with pytest.raises(SourceError, match="--semantic-out .* is SOURCE's own folder"):
        list_sources(str(src), st, dest="elsewhere", semantic_out=str(src) + "/")


def test_outputs_are_never_listed_as_input_on_s3(s3: S3Bucket):
    for key in ["a.jpg", "results/data/x.png", "results/maps/m.png", "resultsX/c.jpg", "maps/d-00000000.png"]:
        s3.put(key, b"img")
    st = Storage(s3.storage_options)
    got = list_sources(s3.url(""), st, dest=s3.url("results"), semantic_out=f"s3a://{s3.bucket}/maps/")
    assert got == [s3.url("a.jpg"), s3.url("resultsX/c.jpg")]


def test_a_raster_whose_name_is_not_utf8_is_read_by_its_uri(tmp_path: Path):
    """GDAL takes UTF-8 paths only: the scene is opened through Storage's opener under its URI's name."""
    import numpy as np
    import rasterio

    from segbatch.geo import TileOptions, Window, raster_info, read_tile
    from segbatch.storage import OpenRasters

    with rasterio.open(tmp_path / "tmp.tif", "w", driver="GTiff", width=64, height=48, count=3, dtype="uint8") as ds:
        ds.write(np.arange(3 * 48 * 64, dtype=np.uint32).reshape(3, 48, 64).astype(np.uint8))
    os.rename(tmp_path / "tmp.tif", os.fsencode(tmp_path) + b"/sc\xe8ne.tif")
    st = Storage()
    [uri] = list_sources(str(tmp_path), st)
    assert uri == f"file://{tmp_path}/sc%E8ne.tif"
    info = raster_info(uri, st, TileOptions(32, 0, None, None))
    assert (info.width, info.height) == (64, 48)
    kept = OpenRasters()
    tile = read_tile(uri, Window(32, 16, 32, 32), st, info, None, kept)
    kept.close()
    expected = np.arange(3 * 48 * 64, dtype=np.uint32).reshape(3, 48, 64).astype(np.uint8)[:, 16:48, 32:64]
    assert (tile == expected.transpose(1, 2, 0)).all()
