"""Credentials masked wherever text leaves segbatch: one place, one rule set.

Two kinds of secret are masked:

- values the job was given as secrets: storage options under secret-looking
  keys (``key``, ``secret``, ``token``, ``password``, ``credential``...), every
  header value (``headers``, ``client_kwargs.headers``: an ``Authorization``
  header is a bearer token) and the secret parts of a ``connection_string``
  (Azure's ``AccountKey=``, ``SharedAccessSignature=``). ``secret_values``
  collects them; ``redact(text, secrets)`` replaces them wherever they occur,
  since a library may quote them in any form;
- secrets carried by a URL or a message whatever the options: a password in
  ``scheme://user:pass@host``, a presigned query (``X-Amz-Signature``,
  ``X-Amz-Credential``, ``X-Amz-Security-Token``, ``X-Goog-Signature``, Azure
  SAS ``sig``/``sv``/``se``/``sp``..., ``token=``) and the secret fields of a
  connection string quoted in a message. These are found by pattern, so a
  URL given as SOURCE, DEST, ``--model`` or ``--semantic-out`` is masked in
  config.json, in Parquet metadata, in log lines and in error messages.

The user name of ``scheme://user@host`` is kept: for ``abfs://container@account...``
it is the container, and no secret.

``find_secrets`` reports where literal secrets are, for ``segbatch submit``,
which refuses to send any (a job's entrypoint and runtime environment are
stored in the cluster's job record and printed in its log).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

MASK = "***"

# Option keys whose values are secrets (any depth of the storage options).
SECRET_KEY = re.compile(
    r"key|secret|token|password|passwd|credential|signature|sas|authorization|cookie", re.IGNORECASE
)
# Keys that match the pattern above but hold no secret (a KMS key's id names the key, it is not one).
_NOT_SECRET_KEY = re.compile(r".*kms.*key.*id|.*endpoint.*|.*region.*", re.IGNORECASE)
# Values of a secret-looking key that are not secrets: gcsfs's ``token`` modes, a credentials file's path.
_NOT_SECRET_VALUE = re.compile(r"google_default|cache|anon|browser|cloud|/\S*\.json|~/\S*", re.IGNORECASE)
_HEADERS_KEY = re.compile(r"^headers$", re.IGNORECASE)
_CONNECTION_STRING_KEY = re.compile(r"connection_?string", re.IGNORECASE)
# Shorter values would mask unrelated text (and hide little).
MIN_SECRET_LEN = 4

# Query parameters of presigned URLs (S3 SigV4 and SigV2, GCS V4, Azure SAS, CloudFront, OAuth).
_QUERY_NAMES = (
    "x-amz-signature x-amz-credential x-amz-security-token x-goog-signature x-goog-credential x-ms-signature "
    "signature sig sv se sp st spr srt ss sr skoid sktid token access_token sas_token id_token refresh_token "
    "api_key apikey key password awsaccesskeyid key-pair-id policy client_secret"
).split()
_QUERY = re.compile(r"([?&;](?:" + "|".join(map(re.escape, _QUERY_NAMES)) + r")=)[^&#\s\"'<>;]+", re.IGNORECASE)
# A password in a URL's user info: scheme://user:PASSWORD@host.
_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^/@\s:\"']*:)[^/@\s\"']+@")
# Secret fields of a connection string (Azure storage, Service Bus, Event Hubs) or of an AWS
# Signature V4 Authorization header, quoted anywhere.
# A SharedAccessSignature is itself a query (sv=...&sig=...): it runs to the next ';'.
_CONNECTION_FIELD = re.compile(
    r"\b((?:AccountKey|SharedAccessKey|Password|Pwd|Credential|Signature)=)[^;,&\s\"']+"
    r"|\b(SharedAccessSignature=)[^;\s\"']+",
    re.IGNORECASE,
)
# An Authorization header quoted in a message: "Authorization: Bearer X", "'Authorization': 'X'".
_AUTH_HEADER = re.compile(
    r"((?:proxy-)?authorization['\"]?\s*[:=]\s*['\"]?(?:(?:Bearer|Basic|Digest|Token|SharedKey)\s+)?)[^\s'\",}]+",
    re.IGNORECASE,
)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every known secret value and every credential-looking part masked.

    ``secrets``: values to mask wherever they occur (``secret_values`` of the
    options), longest first so one that contains another is masked whole.
    """
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, MASK)
    text = _USERINFO.sub(lambda m: m.group(1) + MASK + "@", text)
    text = _QUERY.sub(lambda m: m.group(1) + MASK, text)
    text = _CONNECTION_FIELD.sub(lambda m: _prefix(m) + MASK, text)
    return _AUTH_HEADER.sub(lambda m: m.group(1) + MASK, text)


def scrub(value: Any, redact_text: Callable[[str], str] = redact) -> Any:
    """``value`` (JSON-like: dicts, lists, strings) with every string passed
    through ``redact_text`` (e.g. ``Storage.redact``, which knows the job's
    secrets); keys are kept as they are (they may be URIs a reader matches)."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: scrub(v, redact_text) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(scrub(v, redact_text) for v in value)
    return value


def secret_values(options: Any) -> set[str]:
    """The literal secrets in storage options (at any depth), worth masking."""
    return {value for _, value in _secrets(options, "", secret=False)}


def find_secrets(options: Any, where: str = "") -> list[str]:
    """Where ``options`` hold literal secrets: paths such as ``s3.secret`` or
    ``client_kwargs.headers.Authorization`` (never the values)."""
    return sorted({path for path, _ in _secrets(options, where, secret=False)})


def has_secret(text: str) -> bool:
    """Whether ``text`` carries a credential by its form (a URL's password, a
    presigned query, a connection string's key, an Authorization header)."""
    return redact(text) != text


def _secrets(options: Any, path: str, secret: bool) -> Iterable[tuple[str, str]]:
    if isinstance(options, dict):
        for k, v in options.items():
            key = str(k)
            here = f"{path}.{key}" if path else key
            if _CONNECTION_STRING_KEY.search(key) and isinstance(v, str):
                yield from _connection_string(v, here)
            elif _HEADERS_KEY.match(key) and isinstance(v, dict):
                yield from _secrets(v, here, secret=True)  # every header value: Authorization, x-api-key, cookies...
            else:
                yield from _secrets(v, here, secret or _is_secret_key(key))
    elif isinstance(options, (list, tuple)):
        for i, v in enumerate(options):
            yield from _secrets(v, f"{path}[{i}]", secret)
    elif isinstance(options, str):
        if secret and len(options) >= MIN_SECRET_LEN and not _NOT_SECRET_VALUE.fullmatch(options):
            yield path, options
            for part in options.split():  # "Bearer X": X alone is the secret a library may quote
                if part != options and len(part) >= 8:
                    yield path, part
        elif not secret:
            yield from ((path, v) for v in _secrets_in_text(options))


def _prefix(match: re.Match) -> str:
    """The part of a match kept in the clear (the name and '='), whichever alternative matched."""
    return next(g for g in match.groups() if g is not None)


def _is_secret_key(key: str) -> bool:
    return bool(SECRET_KEY.search(key)) and not _NOT_SECRET_KEY.fullmatch(key)


def _connection_string(value: str, path: str) -> Iterable[tuple[str, str]]:
    """A connection string is secret as a whole, and so is each secret field
    (a message may quote only the AccountKey)."""
    if len(value) >= MIN_SECRET_LEN:
        yield path, value
    for field in value.split(";"):
        name, _, secret = field.partition("=")
        if secret and _CONNECTION_FIELD.match(field.strip()) and len(secret) >= MIN_SECRET_LEN:
            yield f"{path}.{name.strip()}", secret


def _secrets_in_text(text: str) -> Iterable[str]:
    """Credentials carried by a plain (non-secret) option value, e.g. an
    ``endpoint_url`` with a password: masked wherever they occur later."""
    for pattern in (_USERINFO, _QUERY, _CONNECTION_FIELD):
        for m in pattern.finditer(text):
            value = m.group(0)[len(_prefix(m)) :].rstrip("@")
            if len(value) >= MIN_SECRET_LEN:
                yield value
