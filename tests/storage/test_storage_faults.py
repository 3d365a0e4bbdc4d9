"""Storage faults sorted at the root: the object's own fault becomes its error
row; any other (access refused, credentials expired, a missing bucket, a
wrong region, throttling that outlasts the retries) is a ``StorageFault``
that never becomes a row.

Against moto's S3 server over HTTP, through tests/faultproxy.py, which
answers S3's own error replies (403 ExpiredToken, 404 NoSuchBucket, ...) for
requests under a path from a given moment on.
"""

from __future__ import annotations

import errno
import io
import pickle
import time

import numpy as np
import pytest
from botocore.exceptions import ClientError, NoCredentialsError
from PIL import Image
from s3fs.errors import translate_boto_error

from segbatch.engine import fetch_and_decode
from segbatch.errors import BucketMissing, SegbatchError, StorageFault, StoreUnavailable
from segbatch.storage import Storage, TooLarge, fault_kind, is_transient, list_sources

from faultproxy import FaultProxy
from s3util import S3Bucket

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
MAX_BYTES, MAX_PIXELS = 10_000_000, 10_000_000


def _png(seed: int = 0) -> bytes:
    img = np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _fast(st: Storage, url: str) -> Storage:
    """Turn off the retries of s3fs and botocore, so every fault reaches Storage's own at once."""
    fs, _ = st.fs(url)
    fs.retries = 1
    fs.config_kwargs = {"retries": {"total_max_attempts": 1}}
    fs.connect(refresh=True)
    return st


def _options(s3: S3Bucket, proxy: FaultProxy) -> dict:
    return {**s3.options_via(proxy.endpoint), "secret": SECRET}  # moto takes any secret: a leak cannot hide


@pytest.mark.parametrize(
    "code, store_wide",
    [
        ("AccessDenied", False),  # a bucket policy changed: maybe this object only, the driver counts them
        ("ExpiredToken", True),  # the credentials themselves: every object of the store is refused
        ("InvalidAccessKeyId", True),
        ("SignatureDoesNotMatch", True),
        ("RequestTimeTooSkewed", True),
    ],
)
def test_a_denied_read_is_a_fault_never_a_row(s3: S3Bucket, targeted_proxy: FaultProxy, code: str, store_wide: bool):
    """Access revoked mid-job: the read raises a StorageFault naming the URL and the fix, never an error row;
    the same read succeeds once access is back (a rerun resumes). A missing object beside it is still its row."""
    for i in range(3):
        s3.put(f"in/{i}.png", _png(i))
    st = Storage(_options(s3, targeted_proxy), retries=3, backoff_s=0.01)
    url = s3.url("in/1.png")
    assert fetch_and_decode(s3.url("in/0.png"), st, MAX_BYTES, MAX_PIXELS).error_row is None  # before: fine

    targeted_proxy.deny(f"/{s3.bucket}/in/", code=code)
    with pytest.raises(StorageFault) as caught:
        st.read_bytes(url, max_bytes=MAX_BYTES)  # one ranged GET, as the pipeline reads: S3's error body names the code
    fault = caught.value
    assert fault.kind == "denied" and isinstance(fault, StoreUnavailable) == store_wide
    assert isinstance(fault, OSError) and isinstance(fault, SegbatchError)  # old `except OSError` sites see it
    assert url in str(fault) and code in str(fault) and "run the same command again" in str(fault)
    assert SECRET not in str(fault) and SECRET not in repr(pickle.loads(pickle.dumps(fault)).__dict__)
    if store_wide:
        assert f"credentials for s3://{s3.bucket} expired or were revoked" in str(fault)
    with pytest.raises(StorageFault):  # the pipeline raises it: the shard fails, no row is written
        fetch_and_decode(url, st, MAX_BYTES, MAX_PIXELS)
    assert targeted_proxy.counts[f"denied:{code}"] >= 2

    missing = fetch_and_decode(s3.url("elsewhere/missing.png"), st, MAX_BYTES, MAX_PIXELS)  # not denied: gone
    assert missing.error_row is not None and missing.error_row["error"].startswith("not found")

    targeted_proxy.allow()
    assert fetch_and_decode(url, st, MAX_BYTES, MAX_PIXELS).image is not None


def test_a_missing_object_stays_not_found(s3: S3Bucket, tmp_path):
    """FileNotFoundError of an object gone from a bucket that exists is the object's own: it stays as it was."""
    st = Storage(s3.storage_options)
    for url in (s3.url("nope.png"), str(tmp_path / "nope.png")):
        with pytest.raises(FileNotFoundError) as caught:
            st.read_bytes(url, max_bytes=100)
        assert not isinstance(caught.value, StorageFault)
        row = fetch_and_decode(url, st, MAX_BYTES, MAX_PIXELS).error_row
        assert row is not None and row["error"] == "not found: no such file or object"
    s3.put("big.png", b"x" * 200)
    too_large = fetch_and_decode(s3.url("big.png"), st, 100, MAX_PIXELS).error_row
    assert too_large["error"].startswith("cannot read: TooLarge")
    (tmp_path / "folder.png").mkdir()
    assert fetch_and_decode(str(tmp_path / "folder.png"), st, MAX_BYTES, MAX_PIXELS).error_row is not None


def test_a_missing_bucket_names_it(s3: S3Bucket):
    """NoSuchBucket (which s3fs maps to FileNotFoundError, as for a missing object) stops the store at once."""
    st = Storage(s3.storage_options)
    bucket = f"{s3.bucket}-gone"
    for call in (
        lambda: st.read_bytes(f"s3://{bucket}/a.png", max_bytes=100),
        lambda: st.write_bytes(f"s3://{bucket}/out/x.json", b"{}"),
        lambda: list_sources(f"s3://{bucket}/in/", st),
        lambda: fetch_and_decode(f"s3://{bucket}/a.png", st, MAX_BYTES, MAX_PIXELS),
    ):
        with pytest.raises(BucketMissing) as caught:
            call()
        fault = caught.value
        assert isinstance(fault, StoreUnavailable) and fault.kind == "no-bucket" and fault.exit_code == 2
        assert str(fault) == (
            f"bucket {bucket} does not exist (or the endpoint/region is wrong): check the URL and --storage-options"
        )


def test_a_wrong_region_is_store_wide(s3: S3Bucket, targeted_proxy: FaultProxy):
    s3.put("in/a.png", _png())
    st = _fast(Storage(_options(s3, targeted_proxy), retries=1, backoff_s=0.01), s3.url())
    targeted_proxy.deny(f"/{s3.bucket}/", code="PermanentRedirect")
    with pytest.raises(StoreUnavailable) as caught:
        st.read_bytes(s3.url("in/a.png"), max_bytes=MAX_BYTES)
    assert caught.value.kind == "redirect" and "--storage-options" in str(caught.value)


def test_a_storm_that_outlasts_the_retries_is_transient(s3: S3Bucket, targeted_proxy: FaultProxy):
    """Every request throttled (503 SlowDown) or reset: retried with backoff, then a transient StorageFault."""
    s3.put("in/a.png", _png())
    for modes in (("slowdown",), ("drop",)):
        st = _fast(Storage(_options(s3, targeted_proxy), retries=2, backoff_s=0.01), s3.url())
        targeted_proxy.storm(1.0, modes, path_prefix=f"/{s3.bucket}/in/")
        started = time.monotonic()
        with pytest.raises(StorageFault) as caught:
            fetch_and_decode(s3.url("in/a.png"), st, MAX_BYTES, MAX_PIXELS)
        assert time.monotonic() - started < 30
        fault = caught.value
        assert fault.kind == "transient" and not isinstance(fault, StoreUnavailable) and is_transient(fault)
        assert "after 2 retries" in str(fault) and s3.url("in/a.png") in str(fault)
        targeted_proxy.clear()
        assert fetch_and_decode(s3.url("in/a.png"), st, MAX_BYTES, MAX_PIXELS).image is not None


def test_faults_sorted_by_their_code():
    """s3fs's mapping of each S3 error code, as it raises them, sorted into the object's own or the store's."""

    def s3fs_error(code: str, status: int) -> OSError:
        response = {"Error": {"Code": code, "Message": f"{code} says so"}}
        response["ResponseMetadata"] = {"HTTPStatusCode": status}
        return translate_boto_error(ClientError(response, "GetObject"))

    expected = {
        ("NoSuchKey", 404): None,
        ("404", 404): None,  # a HEAD's reply has no body, hence no code: an object's own
        ("InvalidObjectState", 403): None,  # archived to Glacier: this object's own
        ("NoSuchBucket", 404): "no-bucket",
        ("AccessDenied", 403): "denied",
        ("403", 403): "denied",
        ("ExpiredToken", 400): "credentials",
        ("InvalidAccessKeyId", 403): "credentials",
        ("SignatureDoesNotMatch", 403): "credentials",
        ("RequestTimeTooSkewed", 403): "credentials",
        ("PermanentRedirect", 301): "redirect",
        ("AuthorizationHeaderMalformed", 400): "redirect",
        ("SlowDown", 503): "transient",
        ("InternalError", 500): "transient",
        ("PreconditionFailed", 412): None,  # a conditional create that lost: the caller's
        ("SomethingNew", 400): "transient",  # an unknown refusal: not provably the object's
    }
    got = {key: fault_kind(s3fs_error(*key)) for key in expected}
    assert got == expected
    assert isinstance(s3fs_error("NoSuchBucket", 404), FileNotFoundError)  # why the code must be read
    assert fault_kind(TooLarge("big")) is None and fault_kind(IsADirectoryError("dir")) is None
    assert fault_kind(ValueError("malformed URL")) is None
    assert fault_kind(PermissionError(errno.EACCES, "local file")) == "denied"
    assert fault_kind(ConnectionResetError(errno.ECONNRESET, "reset")) == "transient"
    wrapped = OSError("no credentials")
    wrapped.__cause__ = NoCredentialsError()
    assert fault_kind(wrapped) == "credentials"
