"""The fsspec filesystem of a URL, opened with the user's storage options, and the secrets among them.

Storage options go to fsspec as given, either flat (``{"endpoint_url": ...,
"key": ..., "secret": ...}``: for every remote protocol but HTTP) or keyed by
protocol (``{"s3": {...}, "gcs": {...}}``: used when every top-level key is a
protocol name).

Storage options may hold credentials: they never appear in ``repr``, in a
log line or in an error raised from storage (``Filesystems.redact``).
"""

from __future__ import annotations

import threading
from typing import Any

import fsspec
import fsspec.core

from segbatch.redact import redact as _redact
from segbatch.redact import secret_values as _secret_values

from .urls import LOCAL_PROTOCOLS, aliases, local_path, protocol

# Flat options (credentials, endpoint) are not for these: LocalFileSystem rejects
# unknown kwargs, and HTTPFileSystem would pass them to every request.
_NO_FLAT_OPTIONS = LOCAL_PROTOCOLS | {"http", "https"}


def _known_protocols() -> set[str]:
    return set(fsspec.available_protocols()) | {"file", "local"}


class Filesystems:
    """One fsspec filesystem per protocol, opened with that protocol's options.

    Picklable (Storage, which holds one, is sent to Ray actors): the cached
    filesystems are dropped and rebuilt on first use.
    """

    def __init__(self, options: dict[str, Any] | None = None):
        self._options: dict[str, Any] = dict(options or {})
        self._per_protocol = (
            bool(self._options)
            and all(isinstance(v, dict) for v in self._options.values())
            and set(self._options) <= _known_protocols()
        )
        self._secrets = tuple(sorted(_secret_values(self._options), key=len, reverse=True))
        self._fs: dict[str, fsspec.AbstractFileSystem] = {}
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        """Whether any storage option was given."""
        return bool(self._options)

    def __repr__(self) -> str:
        # never the options: they may carry credentials
        return f"Filesystems(options={'set' if self._options else 'none'})"

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

    def options_for(self, proto: str) -> dict[str, Any]:
        """The fsspec options for one protocol (flat options skip local files and HTTP)."""
        if self._per_protocol:
            for name in aliases(proto):
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

    def fresh(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """Like ``fs`` but with the listing cache for ``url`` dropped: other
        processes (the actors) write here, so a cached listing would lie."""
        fs, path = self.fs(url)
        fs.invalidate_cache(path)
        return fs, path
