"""Storage faults: which are worth retrying, whose they are, and the retry policy.

A storage call is retried with exponential backoff and full jitter on
transient faults (throttling, resets, timeouts) and fails at once on
permanent ones (not found, denied, bad argument): ``RetryPolicy``.

Faults are sorted here, once (``fault_kind``, ``fault_of``), the way the
contract splits them. A fault that is provably the object's own (gone though
its bucket exists, a folder, ``TooLarge``, a malformed URL) is raised as it
came, for the caller to turn into that object's error row. Any other fault
(access refused or expired credentials, a missing bucket, a wrong region,
throttling or resets that outlasted the retries) is raised as
``errors.StorageFault`` (``StoreUnavailable`` when it is the whole store's),
which is never a row.
"""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from segbatch.errors import BucketMissing, StorageFault, StoreUnavailable

from .urls import bucket, is_local

log = logging.getLogger(__name__)

T = TypeVar("T")

PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError, ValueError)
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNRESET",
        "ECONNABORTED",
        "ECONNREFUSED",
        "ETIMEDOUT",
        "EPIPE",
        "EHOSTUNREACH",
        "ENETUNREACH",
        "ENETDOWN",
        "EAGAIN",
        "EBUSY",
        "EREMOTEIO",
    )
    if hasattr(errno, name)
)
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "TooManyRequests",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "PriorRequestNotComplete",
        "429",
        "500",
        "502",
        "503",
        "504",
    }
)
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
    if isinstance(exc, PERMANENT):
        return False
    return any(_is_transient_one(e) for e in [exc, *_chain(exc)])


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


def _chain(exc: BaseException) -> list[BaseException]:
    """The causes (or contexts) of ``exc``, nearest first."""
    out: list[BaseException] = []
    e = exc.__cause__ or exc.__context__
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


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


def _unchanged(text: str) -> str:
    return text


def fault_of(
    exc: BaseException, url: str, retries: int = 0, redact: Callable[[str], str] = _unchanged
) -> StorageFault | None:
    """The ``StorageFault`` that ``exc`` (from a call on ``url``) stands for, its
    message naming the URL (credentials masked by ``redact``), the cause and the fix;
    None when the fault is the object's own (``fault_kind``) and stays as it came."""
    kind = fault_kind(exc)
    if kind is None or isinstance(exc, StorageFault):
        return exc if isinstance(exc, StorageFault) else None
    shown, root = redact(url), redact(bucket(url))
    code = _error_code(exc)[0] or type(exc).__name__
    cause = f"{code}: {redact(str(exc))}" if str(exc) and str(exc) != code else code
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


def scrubbed(exc: Exception, redact: Callable[[str], str]) -> Exception:
    """``exc``, or a copy of it with secrets masked when its text (or its chain's) has any."""
    text = str(exc)
    clean = redact(text)
    if clean == text and not any(redact(str(c)) != str(c) for c in _chain(exc)):
        return exc
    try:
        new = type(exc)(clean)
    except Exception:
        new = OSError(clean)
    if isinstance(exc, OSError) and isinstance(new, OSError):
        new.errno = exc.errno
    return new


class RetryPolicy:
    """How a storage call is retried: after a transient fault (``is_transient``) it
    runs again, at most ``retries`` times, each after a delay drawn uniformly from
    ``[0, min(max_backoff_s, backoff_s * 2**attempt)]`` (full jitter: it spreads out
    the workers a throttled store sent back at once). A permanent fault, or the
    last transient one, is sorted (``fault_of``) and raised with credentials masked.

    redact: masks credentials in log lines and raised errors (``StorageOptions.redact``).
    sleep: waits out a delay; tests pass a fake to run without waiting.
    Picklable when ``redact`` and ``sleep`` are (Storage, which holds one, is sent to Ray actors).
    """

    def __init__(
        self,
        retries: int = 5,
        backoff_s: float = 0.2,
        max_backoff_s: float = 10.0,
        *,
        redact: Callable[[str], str] = _unchanged,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._redact = redact
        self._sleep = sleep

    def delay_s(self, attempt: int) -> float:
        """The wait before retry ``attempt + 1``: full jitter under the capped exponential backoff."""
        return random.uniform(0, min(self.max_backoff_s, self.backoff_s * 2**attempt))

    def call(self, what: str, url: str, fn: Callable[[], T]) -> T:
        """``fn()``, retried as the policy says; ``what`` and ``url`` name the call in log lines and errors."""
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
                        shown = self._redact(url)
                        log.warning("storage: %s %s failed after %d retries; giving up", what, shown, attempt)
                    fault = fault_of(exc, url, attempt, self._redact)
                    if fault is not None:
                        # the original's chain may hold a secret: kept only when clean
                        raise fault from (exc if scrubbed(exc, self._redact) is exc else None)
                    clean = scrubbed(exc, self._redact)
                    if clean is exc:
                        raise
                    raise clean from None  # the original (and its chain) holds a secret
                delay = self.delay_s(attempt)
                attempt += 1
                log.warning(
                    "storage: %s %s failed (%s: %s); retry %d/%d in %.2f s",
                    what,
                    self._redact(url),
                    type(exc).__name__,
                    self._redact(str(exc)),
                    attempt,
                    self.retries,
                    delay,
                )
                self._sleep(delay)
