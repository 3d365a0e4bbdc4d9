"""Shards: the plan cuts the sorted input into consecutive, deterministic units of work.

Where the plan and each shard's commit record live under DEST is ``store.py``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    """A unit of work: consecutive URIs of the sorted input, committed as one file."""

    id: int
    uris: tuple[str, ...]


def make_shards(uris: list[str], shard_size: int) -> list[Shard]:
    """Cut the sorted, de-duplicated URIs into consecutive shards of ``shard_size``.

    Deterministic: the same URIs give the same shards in any order, so a
    rerun's plan matches the first run's.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, not {shard_size}")
    ordered = sorted_unique(uris)
    starts = range(0, len(ordered), shard_size)
    return [Shard(i, tuple(ordered[start : start + shard_size])) for i, start in enumerate(starts)]


def make_shards_from(uris: list[str], shard_size: int, first_id: int) -> list[Shard]:
    """Consecutive chunks of already sorted ``uris``, numbered from ``first_id``."""
    return [Shard(first_id + i, tuple(uris[j : j + shard_size])) for i, j in enumerate(range(0, len(uris), shard_size))]


def sorted_unique(uris: list[str]) -> list[str]:
    # list_sources already returns them so: checking is a tenth of sorting a million again
    if all(a < b for a, b in zip(uris, uris[1:])):
        return list(uris)
    return sorted(set(uris))
