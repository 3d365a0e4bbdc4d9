"""Storage against the local disk and a real S3 (moto over HTTP), faults included."""

from __future__ import annotations

import errno
import logging
import pickle
import time
from pathlib import Path

import pyarrow as pa
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

from segbatch.errors import BucketMissing
from segbatch.storage import Storage, TooLarge, is_transient, join, output_name, protocol

from faultproxy import FaultProxy
from s3util import S3Bucket

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"


def _table() -> pa.Table:
    return pa.table({"uri": ["a", "b", "c"], "n": pa.array([1, 2, 3], pa.int32())})


def test_join_and_protocol():
    assert join("s3://b", "x", "/y.jpg") == "s3://b/x/y.jpg"
    assert join("s3://b/p/", "q") == "s3://b/p/q"
    assert join("/tmp/a", "b", "") == "/tmp/a/b"
    assert protocol("s3://b/k") == "s3"
    assert protocol("/x/y") == protocol("file:///x/y") == "file"


def test_output_names_are_readable_and_never_shared():
    """Class maps of store1/shelf_001.jpg and store2/shelf_001.jpg (or of a.jpg and a.tif)
    must not overwrite each other."""
    uris = ["s3://b/store1/shelf_001.jpg", "s3://b/store2/shelf_001.jpg", "/data/a.jpg", "/data/a.tif"]
    names = [output_name(u, ".png") for u in uris]
    assert len(set(names)) == 4 and names == [output_name(u, ".png") for u in uris]  # stable across runs
    assert names[0].startswith("shelf_001-") and names[0].endswith(".png") and names[2].startswith("a-")


def test_local_roundtrip(tmp_path: Path):
    st = Storage()
    root = str(tmp_path)
    st.write_bytes(join(root, "a", "b", "one.jpg"), b"1")  # parent folders are created
    st.write_bytes(join(root, "a", "two.png"), b"22")
    st.write_bytes(join(root, "three.txt"), b"333")
    assert st.read_bytes(join(root, "a", "two.png")) == b"22"
    assert st.exists(join(root, "a", "two.png")) and not st.exists(join(root, "nope"))
    assert st.size(join(root, "three.txt")) == 3
    expected = sorted([f"{root}/a/b/one.jpg", f"{root}/a/two.png", f"{root}/three.txt"])
    assert st.list_files(root) == expected
    assert st.list_files(f"file://{root}") == expected  # local paths come back plain
    assert st.glob(f"{root}/**/*.jpg") == [f"{root}/a/b/one.jpg"]
    assert st.listdir_names(join(root, "a")) == ["b", "two.png"]
    assert st.listdir_names(join(root, "missing")) == []
    with pytest.raises(TooLarge):
        st.read_bytes(join(root, "three.txt"), max_bytes=2)
    assert st.read_bytes(join(root, "three.txt"), max_bytes=3) == b"333"

    st.write_bytes(join(root, "tmp", "x.part"), b"whole")
    st.commit_file(join(root, "tmp", "x.part"), join(root, "final", "x.bin"))
    assert not st.exists(join(root, "tmp", "x.part"))
    assert st.read_bytes(join(root, "final", "x.bin")) == b"whole"

    st.write_parquet(_table(), join(root, "t.parquet"))
    assert st.read_parquet(join(root, "t.parquet")).equals(_table())
    with st.open(join(root, "a", "two.png")) as f:
        assert f.read() == b"22"
    st.delete(join(root, "a"))
    st.delete(join(root, "a"))  # deleting what is gone is fine
    assert not st.exists(join(root, "a"))


def test_s3_roundtrip(s3: S3Bucket):
    st = Storage(s3.storage_options)
    st.write_bytes(s3.url("in/a/one.jpg"), b"1")
    st.write_bytes(s3.url("in/two.png"), b"22")
    s3.put("in/three.txt", b"333")
    assert s3.get("in/a/one.jpg") == b"1"
    assert st.read_bytes(s3.url("in/three.txt")) == b"333"
    assert st.exists(s3.url("in/two.png")) and not st.exists(s3.url("in/nope"))
    assert st.size(s3.url("in/three.txt")) == 3
    expected = [s3.url("in/a/one.jpg"), s3.url("in/three.txt"), s3.url("in/two.png")]
    assert st.list_files(s3.url("in/")) == expected
    assert st.list_files(s3.url("in")) == expected
    assert st.glob(s3.url("in/**/*.jpg")) == [s3.url("in/a/one.jpg")]
    assert st.glob(s3.url("in/*.png")) == [s3.url("in/two.png")]
    assert st.listdir_names(s3.url("in")) == ["a", "three.txt", "two.png"]
    assert st.listdir_names(s3.url("missing/")) == []
    with pytest.raises(TooLarge):
        st.read_bytes(s3.url("in/three.txt"), max_bytes=2)
    st.write_bytes(s3.url("in/empty.jpg"), b"")
    assert st.read_bytes(s3.url("in/empty.jpg"), max_bytes=10) == b""

    st.write_bytes(s3.url("tmp/x.part"), b"whole")
    st.commit_file(s3.url("tmp/x.part"), s3.url("final/x.bin"))
    assert s3.keys("tmp/") == [] and s3.get("final/x.bin") == b"whole"

    st.write_parquet(_table(), s3.url("t/t.parquet"))
    assert st.read_parquet(s3.url("t/t.parquet")).equals(_table())
    assert st.read_parquet(s3.url("t/t.parquet"), columns=["n"]).column_names == ["n"]
    with st.open(s3.url("in/two.png")) as f:
        assert f.read() == b"22"
    st.delete(s3.url("in/"))
    assert s3.keys("in/") == []


def test_a_read_with_a_limit_is_one_request(s3: S3Bucket, s3_server: str):
    """No HEAD before the GET: one ranged GET per image, whatever its size."""
    s3.put("img/one.jpg", b"x" * 1000)
    s3.put("img/empty.jpg", b"")
    with FaultProxy(s3_server, rate=0.0) as counter:
        st = Storage(s3.options_via(counter.endpoint))
        st.fs(s3.url())  # the filesystem's own set-up requests, if any, before counting
        before = counter.counts["forwarded"]
        assert st.read_bytes(s3.url("img/one.jpg"), max_bytes=1000) == b"x" * 1000
        assert counter.counts["forwarded"] - before == 1
        with pytest.raises(TooLarge, match="more than the limit of 999 bytes"):
            st.read_bytes(s3.url("img/one.jpg"), max_bytes=999)
        assert counter.counts["forwarded"] - before == 2
        assert st.read_bytes(s3.url("img/empty.jpg"), max_bytes=10) == b""  # S3 refuses a range of nothing


def test_listing_sees_writes_of_other_clients(s3: S3Bucket):
    """Actors write while the driver lists: a cached listing would hide their files."""
    st = Storage(s3.storage_options)
    s3.put("c/0.json", b"{}")
    assert st.listdir_names(s3.url("c")) == ["0.json"]
    s3.put("c/1.json", b"{}")
    assert st.listdir_names(s3.url("c")) == ["0.json", "1.json"]
    assert st.exists(s3.url("c/1.json"))
    assert st.list_files(s3.url("c")) == [s3.url("c/0.json"), s3.url("c/1.json")]


def test_options_flat_or_per_protocol(s3: S3Bucket, tmp_path: Path):
    (tmp_path / "f").write_bytes(b"x")
    flat = Storage(s3.storage_options)  # flat options are not handed to the local filesystem
    assert flat.read_bytes(str(tmp_path / "f")) == b"x"
    keyed = Storage({"s3": s3.storage_options, "file": {}})
    keyed.write_bytes(s3.url("k"), b"keyed")
    assert keyed.read_bytes(s3.url("k")) == b"keyed"
    assert keyed.read_bytes(str(tmp_path / "f")) == b"x"
    assert keyed.options_for("s3a") == s3.storage_options
    assert flat.options_for("https") == {}  # HTTPFileSystem would send them with every request


def test_pickle_drops_filesystems(s3: S3Bucket):
    st = Storage(s3.storage_options, retries=2)
    st.write_bytes(s3.url("p"), b"pickled")
    copy = pickle.loads(pickle.dumps(st))
    assert copy.retries == 2 and copy.read_bytes(s3.url("p")) == b"pickled"


def test_credentials_never_shown(s3: S3Bucket, caplog: pytest.LogCaptureFixture, tmp_path: Path):
    caplog.set_level(logging.DEBUG, logger="segbatch")
    options = {"endpoint_url": s3.endpoint, "key": ACCESS_KEY, "secret": SECRET}
    st = Storage(options, retries=2, backoff_s=0.01)
    assert SECRET not in repr(st) and ACCESS_KEY not in repr(st)

    with pytest.raises(BucketMissing) as wrong_bucket:  # not the object's fault: never a "not found" row
        st.read_bytes("s3://no-such-bucket-for-segbatch/x.jpg")
    assert SECRET not in str(wrong_bucket.value) and ACCESS_KEY not in str(wrong_bucket.value)

    # an error whose text holds a secret is masked, and keeps its type
    with pytest.raises(FileNotFoundError) as local:
        st.read_bytes(str(tmp_path / SECRET / "x.jpg"))
    assert SECRET not in str(local.value) and "***" in str(local.value)
    assert local.value.__cause__ is None and local.value.__suppress_context__

    # retries log the URL and the fault, never the options
    with FaultProxy(s3.endpoint, rate=0.5, seed=7) as proxy:
        faulty = Storage({**options, "endpoint_url": proxy.endpoint}, retries=10, backoff_s=0.01)
        _no_stack_retries(faulty, s3.url())
        for i in range(10):
            faulty.write_bytes(s3.url(f"s/{i}"), b"x")
    assert any("retry" in r.getMessage() for r in caplog.records)
    assert all(SECRET not in r.getMessage() and ACCESS_KEY not in r.getMessage() for r in caplog.records)
    assert SECRET not in caplog.text and ACCESS_KEY not in caplog.text
    assert Storage(options).redact(f"key={ACCESS_KEY} secret={SECRET}") == "key=*** secret=***"


def test_not_found_is_not_retried(s3: S3Bucket, caplog: pytest.LogCaptureFixture, tmp_path: Path):
    st = Storage(s3.storage_options, retries=5, backoff_s=2.0)
    started = time.monotonic()
    with pytest.raises(FileNotFoundError):
        st.read_bytes(s3.url("missing.jpg"))
    with pytest.raises(FileNotFoundError):
        st.read_bytes(str(tmp_path / "missing.jpg"))
    with pytest.raises(FileNotFoundError):
        st.size(s3.url("missing.jpg"))
    assert time.monotonic() - started < 1.5
    assert not [r for r in caplog.records if r.name.startswith("segbatch")]


def test_transient_or_permanent():
    def client_error(code: str, status: int) -> ClientError:
        response = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
        return ClientError(response, "GetObject")

    def caused(outer: BaseException, cause: BaseException) -> BaseException:
        outer.__cause__ = cause
        return outer

    transient = [
        ConnectionResetError(errno.ECONNRESET, "reset"),
        TimeoutError("read timed out"),
        OSError(errno.EBUSY, "Please reduce your request rate."),  # s3fs's SlowDown
        client_error("SlowDown", 503),
        client_error("InternalError", 500),
        client_error("TooManyRequests", 429),
        caused(OSError(errno.EIO, "wrapped"), client_error("ServiceUnavailable", 503)),
        EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
        ReadTimeoutError(endpoint_url="http://127.0.0.1:1"),
    ]
    permanent = [
        FileNotFoundError("no such key"),
        PermissionError("denied"),
        ValueError("bad"),
        TooLarge("too big"),
        client_error("NoSuchKey", 404),
        client_error("AccessDenied", 403),
        caused(FileNotFoundError("gone"), TimeoutError()),  # permanent whatever the cause
        OSError(errno.EINVAL, "invalid argument"),
    ]
    assert [is_transient(e) for e in transient] == [True] * len(transient)
    assert [is_transient(e) for e in permanent] == [False] * len(permanent)


def _no_stack_retries(st: Storage, url: str) -> None:
    """Turn off the retries of s3fs and botocore, so every fault reaches Storage's own."""
    fs, _ = st.fs(url)
    fs.retries = 1  # s3fs's own loop: one try
    fs.config_kwargs = {"retries": {"total_max_attempts": 1}}
    fs.connect(refresh=True)


def test_fifty_objects_through_faults(s3: S3Bucket, fault_proxy: FaultProxy, caplog: pytest.LogCaptureFixture):
    """30% of requests throttled, reset or cut short; every object still correct."""
    st = Storage(s3.options_via(fault_proxy.endpoint), retries=10, backoff_s=0.01, max_backoff_s=0.1)
    _no_stack_retries(st, s3.url())
    payloads = {f"many/{i:02d}.bin": bytes([i]) * (1000 + 37 * i) for i in range(50)}
    for key, data in payloads.items():
        st.write_bytes(s3.url(key), data)
    for key, data in payloads.items():
        assert st.read_bytes(s3.url(key)) == data
        assert s3.get(key) == data
    assert st.list_files(s3.url("many/")) == [s3.url(k) for k in sorted(payloads)]
    assert st.glob(s3.url("many/*.bin")) == [s3.url(k) for k in sorted(payloads)]
    st.write_parquet(_table(), s3.url("t/x.tmp"))
    st.commit_file(s3.url("t/x.tmp"), s3.url("t/x.parquet"))
    assert st.read_parquet(s3.url("t/x.parquet")).equals(_table())
    assert s3.keys("t/") == ["t/x.parquet"]
    assert all(fault_proxy.counts[m] > 0 for m in ("slowdown", "drop", "truncate")), fault_proxy.counts
    assert sum(1 for r in caplog.records if r.name == "segbatch.storage.faults" and r.levelno == logging.WARNING) > 10


def test_faults_with_stack_retries(s3: S3Bucket, fault_proxy: FaultProxy):
    """The same faults with s3fs's and botocore's own retries left on (as in production)."""
    st = Storage(s3.options_via(fault_proxy.endpoint), backoff_s=0.01)
    for i in range(6):
        st.write_bytes(s3.url(f"stack/{i}"), bytes([i]) * 100)
    assert [st.read_bytes(s3.url(f"stack/{i}")) for i in range(6)] == [bytes([i]) * 100 for i in range(6)]
