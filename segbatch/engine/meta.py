"""``DEST/_segbatch``: the folder of a job's own files, read and written as JSON."""

from __future__ import annotations

import json
from typing import Any

from segbatch.redact import scrub
from segbatch.storage import Storage, join


class MetaFolder:
    """The job's folder under DEST (``schema.META``) and its small JSON files."""

    def __init__(self, storage: Storage, path: str):
        self.storage = storage
        self.path = path

    def url(self, *names: str) -> str:
        return join(self.path, *names)

    def write_json(self, name: str, d: dict[str, Any]) -> None:
        d = scrub(d, self.storage.redact)  # config, summary, progress may quote a URL with a credential
        self.storage.write_bytes(self.url(name), json.dumps(d, indent=1, sort_keys=True).encode())

    def read_json(self, name: str) -> dict[str, Any] | None:
        """The file's JSON; None when there is no such file."""
        try:
            return json.loads(self.storage.read_bytes(self.url(name)))
        except FileNotFoundError:
            return None
