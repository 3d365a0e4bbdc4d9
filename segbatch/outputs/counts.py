"""Counts of detections per group of images and class: the table a retail job reads.

Groups come from each image's URI through a regular expression with named
groups, e.g. ``store-(?P<store>[^/]+)/shelf-(?P<shelf>[^/]+)/`` for
``s3://shelves/2026-11-21/store-0042/shelf-07/img-001.jpg``: one row per
(store, shelf, class) with the number of detections and of images. Read
from DEST's public rows a record batch at a time.

Every group seen has at least one row, so an empty shelf reads as zero,
not as a missing shelf: a group without detections (at ``min_score``) gets
one row with a null ``label_name`` and 0 ``detections``. ``images`` counts
the group's images that were segmented (status ``ok``); images that could
not be (status ``error``) are counted apart, in ``errors``, as they say
nothing about what is on the shelf.
"""

from __future__ import annotations

import re
from collections import Counter

import pyarrow as pa

from segbatch.errors import UsageError
from segbatch.storage import Storage

from .results import iter_batches


class CountsError(UsageError, ValueError):
    """The grouping expression cannot be used; the message says why."""


def compile_groups(pattern: str) -> re.Pattern:
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise CountsError(f"--count-by {pattern!r} is not a regular expression: {exc}") from None
    if not regex.groupindex:
        raise CountsError(f"--count-by {pattern!r} names no group: use (?P<name>...), e.g. 'store-(?P<store>[^/]+)/'")
    return regex


def count_table(dest: str, storage: Storage, pattern: str, min_score: float = 0.0) -> pa.Table:
    """One row per group and class: the groups' columns, ``label_name``,
    ``detections`` (with score >= ``min_score``), ``images`` (of the group,
    segmented) and ``errors`` (of the group, not segmented).

    Images whose URI does not match fall in a group whose columns are null.
    A group without detections has one row, its ``label_name`` null.
    """
    regex = compile_groups(pattern)
    names = list(regex.groupindex)
    detections: Counter = Counter()
    images: Counter = Counter()
    errors: Counter = Counter()
    for batch in iter_batches(dest, storage, columns=["uri", "status", "detections"]):
        columns = (batch.column(c).to_pylist() for c in ("uri", "status", "detections"))
        for uri, status, dets in zip(*columns):
            found = regex.search(uri)
            group = tuple(found.group(n) for n in names) if found else (None,) * len(names)
            (images if status == "ok" else errors)[group] += 1
            for d in dets:
                if d["score"] >= min_score:
                    detections[group + (d["label_name"],)] += 1
    for group in (images | errors).keys() - {key[:-1] for key in detections}:
        detections[group + (None,)] = 0  # seen, nothing found: a row of zero
    rows = sorted(detections.items(), key=lambda kv: tuple("" if v is None else v for v in kv[0]))
    return pa.table(
        {
            **{n: pa.array([k[i] for k, _ in rows], pa.string()) for i, n in enumerate(names)},
            "label_name": pa.array([k[-1] for k, _ in rows], pa.string()),
            "detections": pa.array([n for _, n in rows], pa.int64()),
            "images": pa.array([images[k[:-1]] for k, _ in rows], pa.int64()),
            "errors": pa.array([errors[k[:-1]] for k, _ in rows], pa.int64()),
        }
    )
