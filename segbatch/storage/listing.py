"""An S3 prefix listed as a stream of keys in key order, fanned out over its
sub-prefixes (``prefix_pages``): what the planner reads a prefix of 100
million keys by, page after page, while the job runs.

One LIST page is 1,000 keys and a round trip (50-100 ms on S3): a flat
listing of 100 million keys is some 100,000 requests one after another. An
archive is split by folders (a day, a camera, a store), so the prefix is
listed with a delimiter first, and its sub-prefixes are listed ``LOOKAHEAD``
at a time, each flat, while their keys are handed on in key order: every key
under ``p/`` sorts between ``p/`` and the entry after it, so a delimiter
listing's files and sub-prefixes, in its order, give the flat listing's.

Each request is a plain ListObjectsV2 (``call``: the caller's retries and
fault rules), never a HEAD or GET on a key: permission on objects does not
decide the listing, and a sub-prefix whose own listing is refused is listed
through its parent's, as the flat listing would have listed it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

log = logging.getLogger(__name__)

LOOKAHEAD = 16  # sub-prefixes listed at once, ahead of the one being handed on
PAGES_A_TASK = 8  # LIST pages one task fetches of a sub-prefix (8,000 keys) before handing them on

ListCall = Callable[[dict[str, Any]], dict[str, Any]]  # a ListObjectsV2 request -> its response


def prefix_pages(call: ListCall, bucket: str, prefix: str, lookahead: int | None = None) -> Iterator[list[str]]:
    """The keys under ``prefix`` ("" or ending in "/"), in key order, a batch at a time.

    ``lookahead``: sub-prefixes listed at once (``LOOKAHEAD``); with 1, one after another (a
    flat listing's pace)."""
    lookahead = max(1, LOOKAHEAD if lookahead is None else lookahead)
    entries = _delimited(call, bucket, prefix)
    with ThreadPoolExecutor(lookahead) as pool:
        ahead: deque[list[str] | tuple[str, Future]] = deque()

        def fill() -> None:
            while len(ahead) < lookahead and (entry := next(entries, None)) is not None:
                files, sub = entry
                ahead.append(files if sub is None else (sub, pool.submit(_flat, call, bucket, sub, prefix, None)))

        fill()
        while ahead:
            entry = ahead.popleft()
            if isinstance(entry, list):
                yield entry
            else:
                sub, running = entry
                keys, token = running.result()
                while token is not None:  # a large sub-prefix: its next pages fetched while these go on
                    running = pool.submit(_flat, call, bucket, sub, prefix, token)
                    yield keys
                    keys, token = running.result()
                yield keys
            fill()


def _delimited(call: ListCall, bucket: str, prefix: str) -> Iterator[tuple[list[str], str | None]]:
    """The delimiter listing of ``prefix``, in key order: (files, None) for a run of keys right
    under it, ([], sub) for a sub-prefix."""
    token: dict[str, str] = {}
    while True:
        page = call({"Bucket": bucket, "Prefix": prefix, "Delimiter": "/", **token})
        entries = sorted(
            [(c["Key"], False) for c in page.get("Contents", ())]
            + [(p["Prefix"], True) for p in page.get("CommonPrefixes", ())]
        )
        files: list[str] = []
        for name, is_sub in entries:
            if not is_sub:
                files.append(name)
                continue
            if files:
                yield files, None
                files = []
            yield [], name
        if files:
            yield files, None
        if not page.get("IsTruncated"):
            return
        token = {"ContinuationToken": page["NextContinuationToken"]}


def _flat(
    call: ListCall, bucket: str, sub: str, parent: str, token: tuple[str, str] | None
) -> tuple[list[str], tuple[str, str] | None]:
    """Up to ``PAGES_A_TASK`` pages of the flat listing of ``sub`` from ``token``: their keys, and
    where to go on from (None: the end).

    A sub-prefix that refuses its own listing (a policy on ``s3:prefix``) is listed through its
    parent's, from where its keys start: the keys, and the faults, of the flat listing of the
    parent that this fan-out stands in for."""
    if token is None:
        try:
            return _pages(call, {"Bucket": bucket, "Prefix": sub}, sub, "sub")
        except Exception as exc:  # the parent's listing says whether the store refuses it too
            log.warning(
                "listing s3://%s/%s failed (%s); listing it through s3://%s/%s", bucket, sub, exc, bucket, parent
            )
            return _pages(call, {"Bucket": bucket, "Prefix": parent, "StartAfter": sub}, sub, "parent")
    via, after = token
    return _pages(
        call, {"Bucket": bucket, "Prefix": sub if via == "sub" else parent, "ContinuationToken": after}, sub, via
    )


def _pages(call: ListCall, request: dict[str, Any], sub: str, via: str) -> tuple[list[str], tuple[str, str] | None]:
    keys: list[str] = []
    for _ in range(PAGES_A_TASK):
        page = call(request)
        listed = [c["Key"] for c in page.get("Contents", ())]
        inside = [k for k in listed if k.startswith(sub)]  # (the parent's listing goes on past it)
        keys += inside
        if len(inside) < len(listed) or not page.get("IsTruncated"):
            return keys, None
        request = {
            **{k: v for k, v in request.items() if k != "StartAfter"},
            "ContinuationToken": page["NextContinuationToken"],
        }
    return keys, (via, request["ContinuationToken"])
