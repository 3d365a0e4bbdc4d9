"""Storage: the one place that knows how a URL is opened.

Every call goes through fsspec with the job's storage options, is retried
with exponential backoff and full jitter on transient faults (throttling,
resets, timeouts) and fails at once on permanent ones (not found, denied,
bad argument). Local paths come back as plain absolute paths; remote URLs
keep their protocol (``s3://bucket/key``).

Storage options go to fsspec as given, either flat (``{"endpoint_url": ...,
"key": ..., "secret": ...}``: for every remote protocol but HTTP) or keyed by
protocol (``{"s3": {...}, "gcs": {...}}``: used when every top-level key is a
protocol name).

Storage options may hold credentials: they never appear in ``repr``, in a
log line or in an error raised from here (see ``Storage.redact``).

Faults are sorted here, once (``fault_of``), the way the contract splits
them. A fault that is provably the object's own (gone though its bucket
exists, a folder, ``TooLarge``, a malformed URL) is raised as it came, for
the caller to turn into that object's error row. Any other fault (access
refused or expired credentials, a missing bucket, a wrong region, throttling
or resets that outlasted the retries) is raised as ``errors.StorageFault``
(``StoreUnavailable`` when it is the whole store's), which is never a row.

Names that are not UTF-8: a local file name may hold any bytes, but a URI
in the plan, a Parquet row or JSON must be text. One rule (``local_uri``): a
local path that is not valid UTF-8 becomes an RFC 8089 ``file://`` URI with
its undecodable bytes, and ``%`` itself, percent-encoded
(``file:///data/caf%E9.jpg``); every Storage call maps such a URI back to
the bytes path. Other paths and URLs stay as they are; object stores hold
UTF-8 keys only, so the rule never fires there.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import logging
import os
import posixpath
import random
import shutil
import threading
import time
import urllib.parse
import uuid
from typing import IO, Any, Callable, Iterator, TypeVar

import fsspec
import fsspec.core
import pyarrow as pa
import pyarrow.parquet as pq

from segbatch.errors import BucketMissing, StorageFault, StoreUnavailable
from segbatch.redact import redact as _redact
from segbatch.redact import secret_values as _secret_values

log = logging.getLogger(__name__)

T = TypeVar("T")

LOCAL_PROTOCOLS = frozenset({"file", "local"})
# Flat options (credentials, endpoint) are not for these: LocalFileSystem rejects
# unknown kwargs, and HTTPFileSystem would pass them to every request.
_NO_FLAT_OPTIONS = LOCAL_PROTOCOLS | {"http", "https"}
# Object stores have no folders, and an object PUT or copy is atomic.
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "oci", "r2"})

_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError, ValueError)
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNRESET", "ECONNABORTED", "ECONNREFUSED", "ETIMEDOUT", "EPIPE", "EHOSTUNREACH",
        "ENETUNREACH", "ENETDOWN", "EAGAIN", "EBUSY", "EREMOTEIO",
    )
    if hasattr(errno, name)
)  # fmt: skip
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
        "TooManyRequests", "TooManyRequestsException", "RequestLimitExceeded", "RequestTimeout",
        "RequestTimeoutException", "InternalError", "ServiceUnavailable", "PriorRequestNotComplete",
        "429", "500", "502", "503", "504",
    }
)  # fmt: skip
_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
_TRANSIENT_TEXT = ("SlowDown", "reduce your request rate", "ServiceUnavailable", "Throttl")


def _optional_transient_types() -> tuple[type[BaseException], ...]:
    """Connection-level error classes of the HTTP stacks fsspec backends use."""
    types: list[type[BaseException]] = []
    try:
        import http.client

        types.append(http.client.IncompleteRead)
    except ImportError:  # pragma: no cover
        pass
    try:
        import aiohttp

        types += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, aiohttp.ServerTimeoutError]
    except ImportError:  # pragma: no cover
        pass
    try:
        from botocore import exceptions as bex

        types += [bex.ConnectionError, bex.HTTPClientError, bex.IncompleteReadError, bex.ResponseStreamingError]
        # throttling replies sometimes carry invalid XML (fsspec/s3fs#484)
        types.append(bex.ResponseParserError)
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    return tuple(types)


_TRANSIENT_TYPES: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError) + _optional_transient_types()


class TooLarge(ValueError):
    """A file is larger than the caller allows."""


def protocol(url: str) -> str:
    """The URL's protocol: ``s3`` for ``s3://b/k``, ``file`` for a plain path."""
    proto, _ = fsspec.core.split_protocol(url)
    return "file" if proto in (None, "local") else proto


def is_local(url: str) -> bool:
    return protocol(url) in LOCAL_PROTOCOLS


def join(base: str, *parts: str) -> str:
    """Join path parts onto a path or URL with ``/``, keeping the protocol."""
    out = base
    for part in parts:
        part = str(part).lstrip("/")
        if not part:
            continue
        out = out if out.endswith(("/", "://")) else out + "/"
        out += part
    return out


def output_name(uri: str, suffix: str) -> str:
    """A file name for an output made from the input ``uri``: its stem and the
    first 8 hex digits of the URI's SHA-1 (``shelf_001-7c3d1134.png`` for
    ``s3://b/store1/shelf_001.jpg``), so that inputs of one name in other
    folders, or with other extensions, never share it."""
    stem = posixpath.splitext(posixpath.basename(uri.rstrip("/")))[0]
    return f"{stem}-{hashlib.sha1(uri.encode()).hexdigest()[:8]}{suffix}"


def is_transient(exc: BaseException) -> bool:
    """True for faults worth retrying: throttling, 5xx, resets, timeouts.

    Backends wrap errors (s3fs turns a botocore ClientError into an OSError
    with the ClientError as cause), so the cause chain is searched too; an
    exception that is itself permanent (not found, denied, bad value) is
    never retried whatever its cause. A ``StorageFault`` is transient when
    its kind says so (its retries are spent: a later attempt may succeed).
    """
    if isinstance(exc, StorageFault):
        return exc.kind == "transient"
    if isinstance(exc, _PERMANENT):
        return False
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if _is_transient_one(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _is_transient_one(e: BaseException) -> bool:
    if isinstance(e, _TRANSIENT_TYPES):
        return True
    response = getattr(e, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code in _TRANSIENT_CODES or status in _TRANSIENT_STATUS
    status = getattr(e, "status", None) or getattr(e, "code", None)  # aiohttp / http errors
    if isinstance(status, int) and status in _TRANSIENT_STATUS:
        return True
    if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
        return True
    text = str(e)
    return any(t in text for t in _TRANSIENT_TEXT)


# -- faults: the object's own, or the store's ------------------------------------------
# s3fs maps S3's error codes onto PermissionError, FileNotFoundError or a plain OSError,
# which loses what matters here: the code stays on the botocore ClientError it chains.

# the credentials themselves are refused: every object of the store is, not this one
_CREDENTIAL_CODES = frozenset(
    {
        *("ExpiredToken", "ExpiredTokenException", "InvalidAccessKeyId", "InvalidClientTokenId"),
        *("SignatureDoesNotMatch", "RequestTimeTooSkewed", "InvalidToken", "TokenRefreshRequired"),
        *("InvalidSecurity", "AccountProblem", "AllAccessDisabled", "NotSignedUp"),
    }
)
_DENIED_CODES = frozenset({"AccessDenied", "AccessDeniedException", "Forbidden", "InvalidPayer", "401", "403"})
_NO_BUCKET_CODES = frozenset({"NoSuchBucket"})
_REDIRECT_CODES = frozenset(
    {
        *("PermanentRedirect", "Redirect", "TemporaryRedirect", "301", "307"),
        *("AuthorizationHeaderMalformed", "IllegalLocationConstraintException"),  # a region other than the bucket's
    }
)
# the object's own: gone (its bucket answered), archived (Glacier), or asked for bytes it has not
_OWN_CODES = frozenset({"NoSuchKey", "NoSuchVersion", "404", "InvalidObjectState", "InvalidRange", "416"})
# a condition the caller set (a conditional create that lost): the caller's to handle
_CALLER_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict"})
# botocore's errors for credentials it could not find or refresh (no ClientError: no request was sent)
_NO_CREDENTIALS = frozenset(
    {
        *("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "TokenRetrievalError"),
        *("UnauthorizedSSOTokenError", "SSOTokenLoadError", "RefreshWithMFAUnsupportedError"),
    }
)
_OWN_TYPES = (FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError, TooLarge)


def _error_code(exc: BaseException) -> tuple[str, int | None]:
    """The store's error code and HTTP status found in ``exc``'s cause chain ("" and None: none)."""
    for e in [exc, *_chain(exc)]:
        response = getattr(e, "response", None)  # botocore ClientError
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return str(response.get("Error", {}).get("Code", "")), status if isinstance(status, int) else None
        status = getattr(e, "status", None) or getattr(e, "code", None)  # aiohttp, gcsfs, http errors
        if isinstance(status, int) and 300 <= status < 600:
            return str(status), status
    return "", None


def fault_kind(exc: BaseException) -> str | None:
    """How ``exc`` fails a storage call: None when it is provably the object's
    own (gone though its bucket exists, a folder, too large, a malformed URL)
    or no storage fault at all; else the ``StorageFault`` kind it stands for,
    "credentials" marking refused credentials (a ``StoreUnavailable`` of kind "denied")."""
    if isinstance(exc, StorageFault):
        return exc.kind
    code, status = _error_code(exc)
    if code in _NO_BUCKET_CODES:
        return "no-bucket"
    if code in _CREDENTIAL_CODES or any(type(e).__name__ in _NO_CREDENTIALS for e in [exc, *_chain(exc)]):
        return "credentials"
    if code in _REDIRECT_CODES:
        return "redirect"
    if code in _OWN_CODES or code in _CALLER_CODES:
        return None
    if code in _DENIED_CODES or status in (401, 403) or isinstance(exc, PermissionError):
        return "denied"
    if is_transient(exc):
        return "transient"
    if isinstance(exc, _OWN_TYPES) or not isinstance(exc, OSError):
        return None  # a malformed URL (ValueError), a damaged raster GDAL names (not a store's error)
    return "transient" if code else None  # any other refusal of a remote store is not the object's


def local_uri(path: str) -> str:
    """The URI of a local path: the path itself, unless it is not valid UTF-8
    (a name of raw bytes, as ``os.listdir`` gives it: surrogate-escaped); then
    an RFC 8089 ``file://`` URI of the absolute path with the undecodable bytes,
    and ``%``, percent-encoded (``file:///data/caf%E9.jpg``). ``local_path``
    reverses it. The one place this rule is written."""
    if is_utf8(path):
        return path
    return "file://" + percent_escaped(os.path.abspath(os.path.expanduser(path)))


def is_utf8(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8 (no surrogate-escaped byte of a raw name in it)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def percent_escaped(text: str) -> str:
    """``text`` with each surrogate-escaped byte (``os.fsdecode``'s, or
    ``errors="surrogateescape"``'s) and ``%`` itself percent-encoded: valid UTF-8."""
    out = []
    for ch in text:
        if ch == "%":
            out.append("%25")
        elif "\udc80" <= ch <= "\udcff":  # one byte that was not UTF-8
            out.append(f"%{ord(ch) - 0xDC00:02X}")
        else:
            out.append(ch)
    return "".join(out)


def local_path(uri: str) -> str:
    """The path ``local_uri`` made ``uri`` from (surrogate-escaped, as ``os``
    functions take it); any other path or URL unchanged. A ``file://`` URI is
    read as percent-encoded only when its bytes are not UTF-8, which a URI of
    that rule always holds: ``file:///data/100%25.jpg`` stays as typed."""
    if not uri.startswith("file://") or "%" not in uri:
        return uri
    raw = urllib.parse.unquote_to_bytes(uri[len("file://"):])
    try:
        raw.decode("utf-8")
        return uri
    except UnicodeDecodeError:
        return os.fsdecode(raw)


def normalized(url: str) -> str:
    """``url`` in one spelling, for comparing locations: a local path absolute
    (``out``, ``./out/`` and ``file:///cwd/out`` agree), a remote URL under one
    name of its protocol (``s3a://`` is ``s3://``); no trailing ``/``."""
    if "::" in url:  # a chained URL: compared as given
        return url.rstrip("/")
    if is_local(url):
        path = fsspec.core.split_protocol(local_path(url))[1]
        return os.path.abspath(os.path.expanduser(path))
    proto, path = fsspec.core.split_protocol(url)
    return f"{min(_aliases(proto))}://{path.strip('/')}"


def _bucket(url: str) -> str:
    """``s3://b`` for ``s3://b/k`` (the URL itself when it names no bucket)."""
    proto, path = fsspec.core.split_protocol(url)
    return f"{proto}://{path.split('/', 1)[0]}" if proto and path else url


def _known_protocols() -> set[str]:
    return set(fsspec.available_protocols()) | {"file", "local"}


class Storage:
    """fsspec access with storage options, retries and atomic commits.

    Picklable (it is sent to Ray actors): the cached filesystems are
    dropped and rebuilt on first use.
    """

    def __init__(
        self,
        storage_options: dict[str, Any] | None = None,
        *,
        retries: int = 5,
        backoff_s: float = 0.2,
        max_backoff_s: float = 10.0,
    ):
        self._options: dict[str, Any] = dict(storage_options or {})
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._per_protocol = bool(self._options) and all(
            isinstance(v, dict) for v in self._options.values()
        ) and set(self._options) <= _known_protocols()
        self._secrets = tuple(sorted(_secret_values(self._options), key=len, reverse=True))
        self._fs: dict[str, fsspec.AbstractFileSystem] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        # never the options: they may carry credentials
        return f"Storage(retries={self.retries}, backoff_s={self.backoff_s}, options={'set' if self._options else 'none'})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fs"] = {}
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def redact(self, text: str) -> str:
        """``text`` with every secret-looking option value masked."""
        return _redact(text, self._secrets)

    # -- filesystems ---------------------------------------------------------

    def options_for(self, proto: str) -> dict[str, Any]:
        """The fsspec options for one protocol (flat options skip local files and HTTP)."""
        if self._per_protocol:
            for name in _aliases(proto):
                if name in self._options:
                    return dict(self._options[name])
            return {}
        return {} if proto in _NO_FLAT_OPTIONS else dict(self._options)

    def fs(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """The filesystem for ``url`` (cached per protocol) and the path in it
        (a ``local_uri`` of a name that is not UTF-8 mapped back to its bytes)."""
        url = local_path(url)
        if "::" in url:  # chained URLs carry their own layering: no cache
            return fsspec.core.url_to_fs(url, **self.options_for(protocol(url)))
        proto = protocol(url)
        with self._lock:
            fs = self._fs.get(proto)
            if fs is None:
                fs, path = fsspec.core.url_to_fs(url, **self.options_for(proto))
                self._fs[proto] = fs
                return fs, path
        return fs, fs._strip_protocol(url)

    def _url(self, like: str, path: str) -> str:
        """A full URL for ``path`` in the protocol of ``like`` (a local one by ``local_uri``)."""
        if is_local(like):
            return local_uri(path)
        proto = fsspec.core.split_protocol(like)[0]
        return f"{proto}://{path}"

    # -- retries -------------------------------------------------------------

    def _retry(self, what: str, url: str, fn: Callable[[], T]) -> T:
        attempt = 0
        while True:
            try:
                return fn()
            except StorageFault:
                raise  # sorted, and retried, by the Storage call that raised it
            except Exception as exc:
                transient = is_transient(exc)
                if attempt >= self.retries or not transient:
                    if transient:
                        log.warning("storage: %s %s failed after %d retries; giving up", what, self.redact(url), attempt)
                    fault = self.fault_of(exc, url, attempt)
                    if fault is not None:
                        # the original's chain may hold a secret: kept only when clean
                        raise fault from (exc if self._scrubbed(exc) is exc else None)
                    clean = self._scrubbed(exc)
                    if clean is exc:
                        raise
                    raise clean from None  # the original (and its chain) holds a secret
                # full jitter: spreads out the workers a throttled store sent back at once
                delay = random.uniform(0, min(self.max_backoff_s, self.backoff_s * 2**attempt))
                attempt += 1
                log.warning(
                    "storage: %s %s failed (%s: %s); retry %d/%d in %.2f s",
                    what, self.redact(url), type(exc).__name__, self.redact(str(exc)), attempt, self.retries, delay,
                )  # fmt: skip
                time.sleep(delay)

    def _scrubbed(self, exc: Exception) -> Exception:
        """``exc``, or a copy of it with secrets masked when its text has any."""
        text = str(exc)
        clean = self.redact(text)
        if clean == text and not any(self.redact(str(c)) != str(c) for c in _chain(exc)):
            return exc
        try:
            new = type(exc)(clean)
        except Exception:
            new = OSError(clean)
        if isinstance(exc, OSError) and isinstance(new, OSError):
            new.errno = exc.errno
        return new

    def fault_of(self, exc: BaseException, url: str, retries: int = 0) -> StorageFault | None:
        """The ``StorageFault`` that ``exc`` (from a call on ``url``) stands for, its
        message naming the URL (credentials masked), the cause and the fix; None
        when the fault is the object's own (``fault_kind``) and stays as it came."""
        kind = fault_kind(exc)
        if kind is None or isinstance(exc, StorageFault):
            return exc if isinstance(exc, StorageFault) else None
        shown, root = self.redact(url), self.redact(_bucket(url))
        code = _error_code(exc)[0] or type(exc).__name__
        cause = f"{code}: {self.redact(str(exc))}" if str(exc) and str(exc) != code else code
        again = "run the same command again: it resumes"
        if kind == "no-bucket":
            fix = "check the URL and --storage-options"
            message = f"bucket {root.split('://', 1)[-1]} does not exist (or the endpoint/region is wrong): {fix}"
            return BucketMissing(message, shown, "no-bucket", fix)
        if kind == "credentials":
            fix = f"renew them and {again}"
            message = f"credentials for {root} expired or were revoked ({cause}, on {shown}); {fix}"
            return StoreUnavailable(message, shown, "denied", fix)
        if kind == "redirect":
            fix = 'set its region or endpoint in --storage-options (e.g. {"client_kwargs": {"region_name": "..."}})'
            message = f"{root} is in another region or behind another endpoint ({cause}): {fix}, then {again}"
            return StoreUnavailable(message, shown, "redirect", fix)
        if kind == "denied":
            if is_local(url):
                fix = f"check the file's and its folders' permissions for this user, then {again}"
            else:
                fix = f"renew the credentials for {root} or fix the policy that refuses them, then {again}"
            return StorageFault(f"access to {shown} denied ({cause}): {fix}", shown, "denied")
        tried = f"after {retries} retries" if retries else "at once"
        message = f"storage failed for {shown} {tried} ({cause}): the store is throttling, unreachable or refusing"
        return StorageFault(f"{message}; {again}", shown, "transient")

    def _fresh(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """Like ``fs`` but with the listing cache for ``url`` dropped: other
        processes (the actors) write here, so a cached listing would lie."""
        fs, path = self.fs(url)
        fs.invalidate_cache(path)
        return fs, path

    # -- reads and writes ----------------------------------------------------

    def read_bytes(self, url: str, max_bytes: int | None = None) -> bytes:
        """The whole file; ``TooLarge`` if it has more than ``max_bytes``.

        With a limit, one ranged GET of at most ``max_bytes + 1`` bytes: no
        HEAD for the size first, which would double the requests per image.
        """

        def read() -> bytes:
            fs, path = self._fresh(url)
            if max_bytes is None:
                return fs.cat_file(path)
            try:
                data = fs.cat_file(path, start=0, end=max_bytes + 1)
            except Exception as exc:
                # S3, GCS and HTTP refuse any byte range of an empty file (416): ask its size only then
                if is_transient(exc) or isinstance(exc, _PERMANENT) or fs.size(path) != 0:
                    raise
                data = b""
            if len(data) > max_bytes:
                raise TooLarge(f"{url}: more than the limit of {max_bytes} bytes")
            return data

        return self._retry("read", url, read)

    def write_bytes(self, url: str, data: bytes) -> None:
        """Write a whole file; readers see the old file or the new one, never a part.

        On an object store (``OBJECT_STORES``) one PUT of the final key: the
        object appears whole when the upload completes, so writing aside and
        copying would double the requests for nothing. A local write is not
        atomic: the bytes go to a hidden file beside the target, are synced,
        and renamed over it (``_replace_durably``).
        """

        def write() -> None:
            fs, path = self.fs(url)
            if is_local(url):
                aside = _aside(path)
                try:
                    _write_synced(aside, data)
                    _replace_durably(aside, path)
                finally:
                    if os.path.exists(aside):
                        os.remove(aside)
            else:
                fs.pipe_file(path, data)

        self._retry("write", url, write)

    def create_new(self, url: str, data: bytes) -> bool:
        """Write ``url`` only if it does not exist yet: True when this call made
        it, False when it already existed (whoever wrote it: a retried call
        whose first attempt landed also reads False, so callers that care read
        the file back and compare).

        Atomic where the store has a conditional create: locally a hard link
        of a synced file (``O_EXCL``'s effect without a moment of an empty
        file; plain ``O_EXCL`` where the filesystem has no hard links), on S3
        a PUT with ``If-None-Match: *`` (s3fs's ``mode="create"``; moto and
        AWS answer 412). Elsewhere (``_CONDITIONAL_CREATE`` lacks the
        protocol) it falls back to check-then-write, then reads back: two
        writers in the same instant may both see True there, which is logged.
        """
        proto = protocol(url)
        if is_local(url):
            return self._retry("create", url, lambda: _create_local(self.fs(url)[1], data))

        def create() -> bool:
            fs, path = self.fs(url)
            try:
                fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                return False
            return True

        if proto in _CONDITIONAL_CREATE:
            return self._retry("create", url, create)
        log.warning("storage: %s has no conditional create; %s is created by check-then-write", proto, self.redact(url))
        if self.exists(url):
            return False
        self.write_bytes(url, data)
        return self.read_bytes(url) == data

    def open(self, url: str, mode: str = "rb") -> IO[Any]:
        """A file object (a context manager), for streaming reads or writes."""

        def open_() -> IO[Any]:
            fs, path = self._fresh(url) if "r" in mode else self.fs(url)
            if is_local(url) and any(m in mode for m in "wax"):
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            return fs.open(path, mode)

        return self._retry("open", url, open_)

    def exists(self, url: str) -> bool:
        def exists() -> bool:
            fs, path = self._fresh(url)
            return bool(fs.exists(path))

        return self._retry("exists", url, exists)

    def size(self, url: str) -> int:
        def size() -> int:
            fs, path = self._fresh(url)
            return int(fs.size(path))

        return self._retry("size", url, size)

    def isdir(self, url: str) -> bool:
        def isdir() -> bool:
            fs, path = self._fresh(url)
            return bool(fs.isdir(path))

        return self._retry("isdir", url, isdir)

    # -- listings ------------------------------------------------------------

    def list_files(self, url_prefix: str) -> list[str]:
        """Every file under a folder or prefix (recursive), as full URLs, sorted."""

        def find() -> list[str]:
            fs, path = self._fresh(url_prefix)
            return fs.find(path)

        return sorted(self._url(url_prefix, p) for p in self._retry("list", url_prefix, find))

    def glob(self, pattern: str) -> list[str]:
        """The files (not folders) matching a glob, as full URLs, sorted."""

        def glob() -> dict[str, Any]:
            fs, path = self._fresh(pattern)
            return fs.glob(path, detail=True)

        found = self._retry("glob", pattern, glob)
        return sorted(self._url(pattern, p) for p, info in found.items() if info.get("type") != "directory")

    def listdir_names(self, url: str) -> list[str]:
        """The names (not paths) in a folder; [] when it does not exist."""

        def ls() -> list[str]:
            fs, path = self._fresh(url)
            try:
                return fs.ls(path, detail=False)
            except FileNotFoundError:
                return []

        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self._retry("list", url, ls))

    # -- changes -------------------------------------------------------------

    def commit_file(self, tmp_url: str, final_url: str) -> None:
        """Publish ``tmp_url`` as ``final_url`` atomically, then drop ``tmp_url``.

        For a file already written elsewhere; bytes still in memory go to
        their final name with ``write_bytes`` instead (one PUT on object stores).
        """
        if is_local(tmp_url) and is_local(final_url):
            _, tmp = self.fs(tmp_url)
            _, final = self.fs(final_url)
            os.makedirs(os.path.dirname(final) or ".", exist_ok=True)
            self._retry("commit", final_url, lambda: _replace_durably(tmp, final, sync_file=True))
            return

        def copy() -> None:
            fs, tmp = self.fs(tmp_url)
            fs.copy(tmp, self.fs(final_url)[1])

        # copy and delete as two retried steps: a retried delete that already
        # happened is fine, a retried move that half happened is not
        self._retry("commit", final_url, copy)
        self.delete(tmp_url)

    def delete(self, url: str) -> None:
        """Remove a file or a folder with everything under it; missing is fine."""

        def rm() -> None:
            fs, path = self._fresh(url)
            try:
                fs.rm(path, recursive=True)
            except FileNotFoundError:
                pass

        self._retry("delete", url, rm)

    def makedirs(self, url: str) -> None:
        """Create a folder (a no-op on object stores, which have none)."""
        if protocol(url) in OBJECT_STORES:
            return
        fs, path = self.fs(url)
        self._retry("makedirs", url, lambda: fs.makedirs(path, exist_ok=True))

    # -- rasters -------------------------------------------------------------

    def read_raster(self, url: str, read: Callable[[Any], T], kept: OpenRasters | None = None) -> T:
        """``read(dataset)`` on the rasterio dataset of ``url``: opened and read as one retried step.

        Local files go to GDAL as paths; any other URL is read through this
        storage's fsspec filesystem (rasterio's ``opener``), so storage options
        and endpoints apply and GDAL asks for byte ranges, never the whole file.
        GDAL hides the faults of the Python files it reads (a reset turns into
        a generic RasterioIOError, or into nothing when GDAL reads again), so
        each step notes the faults of its reads and, having seen one, is not
        trusted: retried when transient, else (or retries spent) it raises it.

        kept: where this thread's dataset of ``url`` stays open after a good
        read, for the next read to reuse (``OpenRasters``); a step that failed
        closes its dataset, so a retry opens the raster afresh.
        """

        def step() -> T:
            held = kept.take(url) if kept is not None else None
            ds, faults = held if held is not None else (None, [])
            faults.clear()  # a kept dataset's opener still notes into its list
            try:
                with _surfacing(faults):
                    if ds is None:
                        ds = self._open_raster(url, faults)
                    out = read(ds)
            except BaseException:
                if ds is not None:
                    ds.close()
                raise
            if kept is None:
                ds.close()
            else:
                kept.keep(url, ds, faults)
            return out

        return self._retry("read", url, step)

    def _open_raster(self, url: str, faults: list[BaseException]) -> Any:
        """A rasterio dataset for ``url``: a local path as is, any other URL
        through its fsspec filesystem, the faults seen noted in ``faults``
        (so is a local name that is not UTF-8: GDAL takes UTF-8 paths only)."""
        import rasterio

        fs, path = self.fs(url)
        if is_local(url) and is_utf8(path):
            return rasterio.open(path)
        if is_local(url):
            return rasterio.open(percent_escaped(path), opener=_FaultNotingOpener(fs, faults, escaped=True))
        return rasterio.open(path, opener=_FaultNotingOpener(fs, faults))

    def upload_file(self, local_path: str, url: str) -> None:
        """Publish a local file at ``url`` whole (a rename locally, one upload elsewhere)."""
        if is_local(url):
            _, final = self.fs(url)
            aside = _aside(final)
            try:
                shutil.copyfile(local_path, aside)  # beside the target: the rename below stays on one filesystem
                self._retry("commit", url, lambda: _replace_durably(aside, final, sync_file=True))
            finally:
                if os.path.exists(aside):
                    os.remove(aside)
            return
        fs, path = self.fs(url)
        self._retry("upload", url, lambda: fs.put_file(local_path, path))

    # -- parquet -------------------------------------------------------------

    def write_parquet(self, table: pa.Table, url: str, **kw: Any) -> None:
        """Write ``table`` as one Parquet file (kw go to ``pyarrow.parquet.write_table``).

        Encoded in memory, then written whole: one PUT on object stores, and
        a retry starts from the bytes rather than from a half-written stream.
        """
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, **kw)
        self.write_bytes(url, sink.getvalue().to_pybytes())

    def read_parquet(self, url: str, columns: list[str] | None = None) -> pa.Table:
        """One Parquet file as a table (optionally only some columns)."""

        def read() -> pa.Table:
            fs, path = self._fresh(url)
            if is_local(url):
                return pq.read_table(path, columns=columns)
            return pq.read_table(path, columns=columns, filesystem=fs)

        return self._retry("read", url, read)

    def read_parquet_metadata(self, url: str) -> pq.FileMetaData:
        """A Parquet file's footer (schema, row count), without its data."""

        def read() -> pq.FileMetaData:
            fs, path = self._fresh(url)
            with fs.open(path, "rb") as f:
                return pq.read_metadata(f)

        return self._retry("read", url, read)


# -- local commits and conditional creates (write_bytes, commit_file, upload_file, create_new) --

# Stores whose fsspec backend creates a file only if absent in one request (s3fs: If-None-Match: *).
_CONDITIONAL_CREATE = frozenset({"s3", "s3a"})
_NO_HARD_LINKS = frozenset(getattr(errno, n) for n in ("EPERM", "ENOTSUP", "EOPNOTSUPP", "ENOSYS") if hasattr(errno, n))


def _aside(path: str) -> str:
    """A hidden name beside ``path`` for its bytes in the making: a reader of the
    folder (pyarrow, Spark and Polars skip dot files; ``*.parquet`` globs miss it)
    never sees a part, and the rename to ``path`` stays on one filesystem."""
    folder, name = os.path.split(path)
    os.makedirs(folder or ".", exist_ok=True)
    return os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp")


def _replace_durably(src: str, dst: str, sync_file: bool = False) -> None:
    """Rename ``src`` over ``dst`` so that after a crash or power loss ``dst``
    is the old file or the whole new one.

    sync_file: sync ``src``'s data first (callers that wrote it themselves
    already did): ext4 and XFS may otherwise commit the rename before the
    blocks, leaving the new name on an empty file. The folder is synced
    after, or the rename itself may be lost.
    """
    if sync_file:
        with open(src, "rb") as f:
            os.fsync(f.fileno())
    os.replace(src, dst)
    _fsync_dir(os.path.dirname(dst) or ".")


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows opens no folder; NTFS journals its renames
        return
    try:
        os.fsync(fd)
    except OSError:  # some network filesystems refuse a folder's fsync
        pass
    finally:
        os.close(fd)


def _write_synced(path: str, data: bytes, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> None:
    with os.fdopen(os.open(path, flags, 0o644), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _create_local(path: str, data: bytes) -> bool:
    """``path`` with ``data`` if it does not exist (True), else False; see ``Storage.create_new``."""
    aside = _aside(path)
    try:
        _write_synced(aside, data)
        try:
            os.link(aside, path)  # fails if path exists, and path never shows less than all of data
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            try:  # a filesystem without hard links (FAT, some SMB mounts): O_EXCL, empty for a moment
                _write_synced(path, data, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                return False
        _fsync_dir(os.path.dirname(path) or ".")
        return True
    finally:
        if os.path.exists(aside):
            os.remove(aside)


@contextlib.contextmanager
def _surfacing(faults: list[BaseException]) -> Iterator[None]:
    """Raise the first fault noted in ``faults`` in place of GDAL's own error,
    or of its success: GDAL reports neither faithfully."""
    try:
        yield
    except Exception:
        if faults:
            raise faults[0]  # the cause GDAL's own error hides
        raise
    if faults:
        raise faults[0]


class OpenRasters:
    """Rasters kept open between reads, at most one per thread: the tiles of a
    scene read one after another by one I/O thread share its dataset, so its
    header is read once and its file's read-ahead serves the next tile too.

    A dataset is only ever read by the thread that opened it (GDAL's datasets
    are not thread-safe) and at most one per thread is kept, which bounds the
    memory (each holds its file's read-ahead block and GDAL's block cache).
    ``close`` closes them all, from any thread, at the end of a shard.
    """

    def __init__(self) -> None:
        self._held: dict[int, tuple[str, Any, list[BaseException], contextvars.Context]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def take(self, url: str) -> tuple[Any, list[BaseException]] | None:
        """This thread's dataset of ``url`` and its fault list, now the caller's;
        None when it holds none (one of another raster is closed)."""
        with self._lock:
            held = self._held.pop(threading.get_ident(), None)
        if held is None:
            return None
        if held[0] != url:
            _close_in(held)
            return None
        return held[1], held[2]

    def keep(self, url: str, ds: Any, faults: list[BaseException]) -> None:
        """Keep ``ds`` open as this thread's (closing the one it held, if any)."""
        # rasterio's opener registers the file in this thread's context: it must close there
        held = (url, ds, faults, contextvars.copy_context())
        with self._lock:
            if self._closed:  # a read that outlived its shard (one cancelled midway)
                old = held
            else:
                old = self._held.pop(threading.get_ident(), None)
                self._held[threading.get_ident()] = held
        if old is not None:
            _close_in(old)

    def close(self) -> None:
        """Close every kept dataset, and any kept from now on (from any thread)."""
        with self._lock:
            held, self._held, self._closed = list(self._held.values()), {}, True
        for h in held:
            _close_in(h)

    def __len__(self) -> int:
        return len(self._held)


def _close_in(held: tuple[str, Any, list[BaseException], contextvars.Context]) -> None:
    """Close a kept dataset in the context it was opened in; a failing close only logs."""
    ds, ctx = held[1], held[3]
    try:
        ctx.run(ds.close)
    except Exception as exc:  # a fault of the file's close: nothing was left to read from it
        log.debug("closing a kept raster failed: %s: %s", type(exc).__name__, exc)


class _FaultNotingOpener:
    """An fsspec filesystem as rasterio's opener that notes in ``faults`` the
    storage faults of its calls (``fault_kind``) and every fault of its files' reads.

    A failed read returns no bytes rather than raising: rasterio's bridge to
    GDAL cannot carry an exception (during an open the process aborts in C++).
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, faults: list[BaseException], escaped: bool = False):
        self._fs = fs
        self._faults = faults
        # escaped: GDAL was given a local name that is not UTF-8 as ``percent_escaped`` (it takes
        # UTF-8 only): each path it asks for (the file, or a sidecar such as .ovr) is mapped back
        self._escaped = escaped

    def open(self, path: str, mode: str = "rb", **kw: Any) -> _FaultNotingFile:
        return _FaultNotingFile(self._noted(self._fs.open)(path, mode, **kw), self._faults)

    def __getattr__(self, name: str) -> Any:  # size, isfile, isdir, ls: GDAL's stat and listing
        attr = getattr(self._fs, name)
        return self._noted(attr) if callable(attr) else attr

    def _noted(self, fn: Callable[..., T]) -> Callable[..., T]:
        def call(*args: Any, **kw: Any) -> T:
            if self._escaped and args and isinstance(args[0], str):
                args = (local_path("file://" + args[0]).removeprefix("file://"), *args[1:])
            try:
                out = fn(*args, **kw)
                return _escaped_names(out) if self._escaped else out
            except Exception as exc:
                # GDAL would report a refused or throttled read as a damaged file: keep the real cause
                if fault_kind(exc) is not None:
                    self._faults.append(exc)
                raise

        return call


def _escaped_names(out: Any) -> Any:
    """A listing's names ``percent_escaped`` (for GDAL, which takes UTF-8 only); anything else as it is."""
    if isinstance(out, str):
        return out if is_utf8(out) else percent_escaped(out)
    if isinstance(out, list):
        return [_escaped_names(v) for v in out]
    if isinstance(out, dict) and isinstance(out.get("name"), str):
        return {**out, "name": _escaped_names(out["name"])}
    return out


class _FaultNotingFile:
    """A file object for GDAL whose failed reads return b"" and are noted in ``faults``
    (any fault: a short read makes what GDAL returns untrustworthy)."""

    def __init__(self, f: Any, faults: list[BaseException]):
        self._f = f
        self._faults = faults

    def read(self, size: int = -1) -> bytes:
        try:
            return self._f.read(size)
        except Exception as exc:
            self._faults.append(exc)
            return b""

    def __enter__(self) -> _FaultNotingFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.close()

    def __getattr__(self, name: str) -> Any:  # seek, tell, close
        return getattr(self._f, name)


_ALIASES = ({"s3", "s3a"}, {"gs", "gcs"}, {"az", "abfs", "abfss"})


def _aliases(proto: str) -> tuple[str, ...]:
    """``proto`` and the other names of its filesystem (``gs``/``gcs``)."""
    names = next((sorted(group) for group in _ALIASES if proto in group), [])
    return (proto, *[n for n in names if n != proto])



def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    e = exc.__cause__ or exc.__context__
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


__all__ = [
    "Storage", "TooLarge", "fault_kind", "is_local", "is_transient", "join", "local_path", "local_uri", "normalized",
    "output_name", "protocol",
]
