"""SOURCE as a STAC document: an Item, an ItemCollection, a Collection or a Catalog.

A geospatial archive is often published as a static STAC catalog rather than
a folder: the scenes are the items' assets, possibly in other buckets or
under other names than their JSON. Each item gives one image, its asset
``--stac-asset`` (``visual`` by default, the true-colour picture most
catalogs carry), and the item's id is kept with it (``StacAssets.ids``) so
the scene's rows say which item they came from.

Every document is read through ``Storage``, never pystac's own HTTP
(``StacIO``): ``s3://`` with an ``endpoint_url``, credentials and retries
work as they do for images; pystac parses the items (``Item.from_dict``,
migrating older STAC versions) and resolves their hrefs. Catalogs are walked
lazily (``_walk``: item JSONs read a few at a time in parallel, children
depth first), relative hrefs resolved against the document that holds them.

An item without the asset among others that have it costs one error row
(``StacAssets.errors``); a catalog where no item has it is the user's
mistake, refused before anything runs (``StacAssetError``, naming the keys
the items do carry).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from segbatch.errors import StorageFault, UsageError

from .files import Storage
from .inventory import is_inventory_manifest
from .urls import protocol

log = logging.getLogger(__name__)

DEFAULT_ASSET = "visual"
STAC_TYPES = ("Feature", "FeatureCollection", "Collection", "Catalog")
_MAX_DOCUMENT_BYTES = 256 * 1024 * 1024  # an ItemCollection of a few hundred thousand items
_READ_THREADS = 16  # item JSONs read at once: each is one small GET, its latency the cost
_READ_AHEAD = 256  # item links read ahead of the walk: what a catalog of a million items holds in memory


class StacError(UsageError, ValueError):
    """SOURCE names a JSON document that is not a STAC one segbatch can read."""


class StacAssetError(StacError):
    """No item of the STAC source has the asset ``--stac-asset`` names."""


@dataclass(frozen=True)
class StacAsset:
    """One item's image: the resolved href of its asset, or why it has none.

    ``uri`` is the asset's href; for an item without the asset, the item's
    own href (or the document's with ``#<id>``), which is the row that
    reports ``error``."""

    uri: str
    item_id: str
    error: str | None = None


@dataclass(frozen=True)
class StacAssets:
    """What a STAC source gives the plan: sorted image URIs, each one's item id,
    and the errors of items without the asset (by URI, among ``uris``)."""

    source: str
    asset: str
    items: list[StacAsset] = field(default_factory=list)

    @cached_property
    def uris(self) -> list[str]:
        return sorted(self.ids)

    @cached_property  # computed once: the driver asks for each scene's
    def ids(self) -> dict[str, str]:
        """Each URI's STAC item id (the first item, when two items share an asset)."""
        out: dict[str, str] = {}
        for a in self.items:
            out.setdefault(a.uri, a.item_id)
        return out

    @cached_property
    def errors(self) -> dict[str, str]:
        return {a.uri: a.error for a in self.items if a.error is not None}


def may_be_stac(source: str) -> bool:
    """Whether SOURCE may name a STAC document: a ``.json`` file, or an HTTP(S)
    URL (a STAC API's item or collection has no suffix). Nothing else is read
    to find out, so folders, globs and manifests are listed as before."""
    return source.lower().rstrip("/").endswith(".json") or protocol(source) in ("http", "https")


def read_stac(source: str, storage: Storage, asset: str = DEFAULT_ASSET) -> StacAssets | None:
    """The images of the STAC document SOURCE, or None when SOURCE is not one
    (``may_be_stac`` false, or an HTTP URL whose body is not JSON: a listing).

    Raises ``StacError`` for a ``.json`` that is not STAC or holds no items,
    ``StacAssetError`` when no item has ``asset``.
    """
    if not may_be_stac(source):
        return None
    json_file = source.lower().rstrip("/").endswith(".json")
    try:
        doc = json.loads(storage.read_bytes(source, _MAX_DOCUMENT_BYTES))
    except Exception as exc:
        if not json_file and not isinstance(exc, StorageFault):
            return None  # an HTTP(S) URL that is no JSON document: listed as before (``sources.py``)
        if isinstance(exc, FileNotFoundError):
            raise StacError(f"SOURCE {source} does not exist") from None
        if isinstance(exc, (UnicodeDecodeError, json.JSONDecodeError)):
            raise StacError(f"SOURCE {source} is not JSON ({exc}); a .json SOURCE must be a STAC document") from None
        raise
    if is_inventory_manifest(doc):
        return None  # an S3 Inventory report: listed by ``sources.py``
    kind = doc.get("type") if isinstance(doc, dict) else None
    if kind not in STAC_TYPES or (kind == "Feature" and "stac_version" not in doc):
        if not json_file:
            return None
        raise StacError(
            f"SOURCE {source} is JSON but not a STAC Item, ItemCollection, Collection or Catalog "
            f"(its type is {kind!r}); give a STAC document, a folder, a glob or a manifest"
        )
    import pystac

    try:
        found = [_asset_of(item, asset, source) for item in _items(doc, kind, source, storage)]
    except FileNotFoundError as exc:
        raise StacError(f"a link of the STAC {kind} {source} leads to nothing: {storage.redact(str(exc))}") from None
    except (pystac.STACError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise StacError(f"the STAC {kind} {source} (or a document it links) is not valid STAC: {exc!r}") from None
    if not found:
        raise StacError(f"the STAC {kind} {source} holds no items (its child and item links lead to none)")
    if all(a.error is not None for a, _ in found):
        keys = sorted({k for _, keys in found for k in keys})
        raise StacAssetError(
            f"no item of {source} has the asset {asset!r} (--stac-asset); their assets are: "
            f"{', '.join(keys) or 'none'}. Pick one with --stac-asset KEY"
        )
    result = StacAssets(source, asset, [a for a, _ in found])
    missing = len(result.errors)
    log.info(
        "%d STAC items in %s: %d images of asset %r%s",
        len(found),
        source,
        len(result.ids) - missing,
        asset,
        f", {missing} items without it (an error row each)" if missing else "",
    )
    return result


def _items(doc: dict[str, Any], kind: str, source: str, storage: Storage) -> Iterator[Any]:
    """The document's items (``pystac.Item``), lazily: itself, its features, or its catalog's tree."""
    import pystac

    if kind == "Feature":
        yield pystac.Item.from_dict(doc, href=source, migrate=True, preserve_dict=False)
    elif kind == "FeatureCollection":
        for feature in doc.get("features") or []:
            yield pystac.Item.from_dict(feature, migrate=True, preserve_dict=False)
    else:
        yield from _walk(doc, source, storage)


def _walk(doc: dict[str, Any], href: str, storage: Storage) -> Iterator[Any]:
    """The items under the Catalog or Collection ``doc`` (at ``href``): its item
    links read ``_READ_AHEAD`` at a time through ``storage``, then its children, depth first.

    Not pystac's own walk (``Catalog.get_items``): that reads one item JSON
    after another (35 items/s from a store 20 ms away, 190 read 16 at once:
    ``bench/bench_stac_plan.py``) and keeps every item it read linked in the
    catalog; here nothing outlives its item's asset.
    """
    import pystac
    from pystac.utils import make_absolute_href

    def read(url: str) -> dict[str, Any]:
        return json.loads(storage.read_bytes(url, _MAX_DOCUMENT_BYTES))

    links = [link for link in doc.get("links") or [] if isinstance(link, dict) and "href" in link]
    items = [make_absolute_href(link["href"], href) for link in links if link.get("rel") == "item"]
    children = [make_absolute_href(link["href"], href) for link in links if link.get("rel") == "child"]
    with ThreadPoolExecutor(_READ_THREADS) as pool:
        for start in range(0, len(items), _READ_AHEAD):
            chunk = items[start : start + _READ_AHEAD]
            for url, d in zip(chunk, pool.map(read, chunk)):
                yield pystac.Item.from_dict(d, href=url, migrate=True, preserve_dict=False)
    for url in children:
        yield from _walk(read(url), url, storage)


def _asset_of(item: Any, asset: str, document: str) -> tuple[StacAsset, list[str]]:
    """The item's ``asset`` href, resolved against the item's own href (or the
    document's when it has none, an ItemCollection's features), and its asset keys."""
    from pystac.utils import is_absolute_href, make_absolute_href

    keys = sorted(item.assets)
    base = item.get_self_href() or document
    if asset in item.assets:
        href = item.assets[asset].href
        return StacAsset(href if is_absolute_href(href) else make_absolute_href(href, base), item.id), keys
    where = item.get_self_href() or f"{document}#{item.id}"
    error = f"STAC item {item.id!r} has no asset {asset!r} (--stac-asset); its assets are: {', '.join(keys) or 'none'}"
    return StacAsset(where, item.id, error), keys
