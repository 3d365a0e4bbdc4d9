"""URLs and paths as text: protocols, joining, output names, and the one rule for names that are not UTF-8.

Pure string functions: nothing here opens a file or talks to a store.

Names that are not UTF-8: a local file name may hold any bytes, but a URI
in the plan, a Parquet row or JSON must be text. One rule (``local_uri``): a
local path that is not valid UTF-8 becomes an RFC 8089 ``file://`` URI with
its undecodable bytes, and ``%`` itself, percent-encoded
(``file:///data/caf%E9.jpg``); every Storage call maps such a URI back to
the bytes path (``local_path``). Other paths and URLs stay as they are; object
stores hold UTF-8 keys only, so the rule never fires there.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import urllib.parse

import fsspec.core

LOCAL_PROTOCOLS = frozenset({"file", "local"})
# Object stores have no folders, and an object PUT or copy is atomic.
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "oci", "r2"})
_ALIASES = ({"s3", "s3a"}, {"gs", "gcs"}, {"az", "abfs", "abfss"})


def protocol(url: str) -> str:
    """The URL's protocol: ``s3`` for ``s3://b/k``, ``file`` for a plain path."""
    proto, _ = fsspec.core.split_protocol(url)
    return "file" if proto in (None, "local") else proto


def is_local(url: str) -> bool:
    return protocol(url) in LOCAL_PROTOCOLS


def aliases(proto: str) -> tuple[str, ...]:
    """``proto`` and the other names of its filesystem (``gs``/``gcs``)."""
    names = next((sorted(group) for group in _ALIASES if proto in group), [])
    return (proto, *[n for n in names if n != proto])


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


def url_like(like: str, path: str) -> str:
    """A full URL for ``path`` (as an fsspec filesystem names it) in the protocol
    of ``like`` (a local one by ``local_uri``)."""
    if is_local(like):
        return local_uri(path)
    proto = fsspec.core.split_protocol(like)[0]
    return f"{proto}://{path}"


def bucket(url: str) -> str:
    """``s3://b`` for ``s3://b/k`` (the URL itself when it names no bucket)."""
    proto, path = fsspec.core.split_protocol(url)
    return f"{proto}://{path.split('/', 1)[0]}" if proto and path else url


def output_name(uri: str, suffix: str) -> str:
    """A file name for an output made from the input ``uri``: its stem and the
    first 8 hex digits of the URI's SHA-1 (``shelf_001-7c3d1134.png`` for
    ``s3://b/store1/shelf_001.jpg``), so that inputs of one name in other
    folders, or with other extensions, never share it."""
    stem = posixpath.splitext(posixpath.basename(uri.rstrip("/")))[0]
    return f"{stem}-{hashlib.sha1(uri.encode()).hexdigest()[:8]}{suffix}"


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
    raw = urllib.parse.unquote_to_bytes(uri[len("file://") :])
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
    return f"{min(aliases(proto))}://{path.strip('/')}"
