"""The commands that read a finished (or running) DEST: ``export``, ``eval``,
``render``, ``counts``, ``report`` and ``publish``. None of them writes into DEST unless told to."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from segbatch.outputs.vector import FORMATS as VECTOR_FORMATS
from segbatch.storage import Storage

from . import options


@click.command()
@click.argument("dest")
@click.argument("out", required=False)
@click.option("--coco", "coco_out", default=None, help="Write COCO results JSON here (path or URL) instead of OUT.")
@click.option("--ground-truth", default=None, help="COCO ground truth: take image ids from it, matched by file name.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(list(VECTOR_FORMATS)),
    default=None,
    help="OUT's vector format [default: from OUT's extension: .gpkg, .geojson, .fgb, .shp].",
)
@click.option(
    "--layer-per-class",
    is_flag=True,
    help="A layer per class name (GeoPackage); one file per class, OUT's stem + _CLASS, for the other formats.",
)
@click.option(
    "--crs", default=None, help="Reproject every object to this CRS (EPSG:4326, ...) [default: the first scene's]."
)
@click.option(
    "--no-spatial-index",
    "no_index",
    is_flag=True,
    help="No R-tree in a GeoPackage or FlatGeobuf (GDAL holds FlatGeobuf's in memory, ~0.4 KB an object).",
)
@options.storage_options
def export(dest, out, coco_out, ground_truth, fmt, layer_per_class, crs, no_index, storage_options) -> None:
    """DEST's objects as a vector file OUT (GeoPackage, GeoJSON, FlatGeobuf, Shapefile), or its
    detections as COCO results JSON (--coco OUT.json, pycocotools' loadRes format).

    A vector export is of a tiled job's objects (DEST/objects): one feature per object with
    uri, label, label_name, score, area (pixels), map_area (CRS units²) and its box in pixels,
    in one CRS (scenes in other CRSs reprojected to it), streamed a scene at a time.
    """
    if bool(out) == bool(coco_out):
        raise click.UsageError("give OUT (a .gpkg, .geojson, .fgb or .shp file) or --coco OUT.json, one of them")
    storage = Storage(storage_options or {})
    if coco_out:
        export_coco(dest, coco_out, ground_truth, storage)
    else:
        export_vector_file(dest, out, fmt, layer_per_class, crs, not no_index, storage)


def export_coco(dest: str, coco_out: str, ground_truth: str | None, storage: Storage) -> None:
    """Each detection has its bbox and score, its mask as RLE ``segmentation`` (mask models)
    and its ``keypoints`` as [x1, y1, v1, ...] with v 1 where visible, else 0, and
    ``keypoint_scores`` beside them (keypoint models), in the ground truth's keypoint
    order when --ground-truth names them."""
    from segbatch.outputs import coco_results, keypoint_layout, match_images, read_rows

    rows = read_rows(dest, storage)
    layout = keypoint_layout(dest, storage)
    ids, categories = None, None  # without ground truth: ids 1.. and the model's labels
    if ground_truth:
        gt = json.loads(storage.read_bytes(ground_truth))
        ids = match_images(rows, gt["images"])
        categories = gt.get("categories")
    results = coco_results(rows, ids, categories, layout.names if layout else None)
    storage.write_bytes(coco_out, json.dumps(results).encode())
    click.echo(f"{len(results)} detections of {len(rows)} images written to {coco_out}", err=True)


def export_vector_file(dest, out, fmt, layer_per_class, crs, spatial_index, storage: Storage) -> None:
    from tqdm import tqdm

    from segbatch.outputs.vector import export_vector, format_of, plan_export

    fmt = format_of(out, fmt)  # before reading DEST: a name GDAL cannot take is the user's to fix first
    plan = plan_export(dest, storage, crs)
    if plan.note:
        click.echo(f"note: {plan.note}", err=True)
    with tqdm(total=len(plan.files), unit="scene", file=sys.stderr, dynamic_ncols=True, disable=None) as bar:
        result = export_vector(
            plan, out, storage, fmt, layer_per_class, on_file=lambda _: bar.update(), spatial_index=spatial_index
        )
    where = ", ".join(result.outputs) or "nothing (no objects)"
    click.echo(
        f"{result.features:,} objects of {len(plan.files):,} scenes in {len(result.layers)} layers written to {where}",
        err=True,
    )


@click.command(name="eval")
@click.argument("dest")
@click.argument("ground_truth")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@options.storage_options
def eval_(dest: str, ground_truth: str, as_json: bool, storage_options: dict | None) -> None:
    """Box, mask and keypoint AP of DEST against COCO GROUND_TRUTH.json (pycocotools' COCOeval).

    Keypoint AP (OKS) when DEST's model gives keypoints and the ground truth has a
    category with ``keypoints`` (COCO's person_keypoints files); mask AP when it gives masks."""
    from segbatch.outputs import evaluate, keypoint_layout, read_rows

    storage = Storage(storage_options or {})
    rows, gt = read_rows(dest, storage), json.loads(storage.read_bytes(ground_truth))
    layout = keypoint_layout(dest, storage)
    figures = evaluate(rows, gt, layout.names if layout else None)
    if as_json:
        click.echo(json.dumps(figures, indent=2))
        return
    click.echo(ap_text(figures))


def ap_text(figures: dict[str, Any]) -> str:
    lines = [f"images matched: {figures['images_matched']} of {figures['images_ground_truth']} in the ground truth"]
    for kind, title in (("bbox", "box "), ("segm", "mask")):
        if kind not in figures:
            continue  # no masks: a keypoint-only model
        f = figures[kind]
        lines.append(
            f"{title} AP {f['AP']:.3f}  AP50 {f['AP50']:.3f}  AP75 {f['AP75']:.3f}  "
            f"APs {f['APs']:.3f}  APm {f['APm']:.3f}  APl {f['APl']:.3f}  AR100 {f['AR100']:.3f}"
        )
    if "keypoints" in figures:
        f = figures["keypoints"]
        lines.append(
            f"keypoints AP {f['AP']:.3f}  AP50 {f['AP50']:.3f}  AP75 {f['AP75']:.3f}  "
            f"APm {f['APm']:.3f}  APl {f['APl']:.3f}  AR {f['AR']:.3f}"
        )
    return "\n".join(lines)


@click.command()
@click.argument("dest")
@click.option(
    "--out", "out_dir", default=None, help="Folder for the PNGs [default: ./NAME-render/, NAME: DEST's last part]."
)
@click.option("--count", type=int, default=8, show_default=True, help="How many images, when --uri is not given.")
@click.option(
    "--uri", "uris", multiple=True, help="An image to render (repeatable); matches a full URI or its file name."
)
@click.option("--min-score", type=float, default=0.0, show_default=True)
@click.option("--seed", type=int, default=0, help="Which sample of images.")
@options.storage_options
def render(dest, out_dir, count, uris, min_score, seed, storage_options) -> None:
    """PNG overlays of masks, boxes, labels and scores on their images (skeletons for keypoint models)."""
    out_dir = out_dir or beside_here(dest, "-render")  # never into DEST: render only reads it
    written = render_to(dest, out_dir, count, uris, min_score, seed, Storage(storage_options or {}))
    click.echo(f"{len(written)} overlays written to {out_dir}", err=True)


def beside_here(dest: str, suffix: str) -> str:
    """A default output of a read-only command, in the current folder and named
    after DEST's last part (``out/demo`` -> ``demo-report.html``): read-only
    commands never write into DEST, which may be another job's, or be running."""
    name = dest.rstrip("/").rsplit("/", 1)[-1].split("://")[-1] or "segbatch"
    return str(Path.cwd() / f"{name}{suffix}")


def render_to(dest, out_dir, count, uris, min_score, seed, storage) -> list[str]:
    """Render overlays of some of DEST's images into ``out_dir``; returns the PNG URLs."""
    import io

    from segbatch.outputs import render_rows
    from segbatch.storage import join, output_name

    written = []
    for uri, picture in render_rows(dest, storage, count, tuple(uris), seed, min_score):
        buf = io.BytesIO()
        picture.save(buf, format="PNG")
        url = join(out_dir, output_name(uri, ".png"))  # unique where archives repeat file names
        storage.write_bytes(url, buf.getvalue())
        written.append(url)
    if uris and not written:
        raise click.ClickException(f"none of {', '.join(uris)} is in {dest} (or none could be read)")
    return written


@click.command()
@click.argument("dest")
@click.option(
    "--by", "pattern", required=True, help="A regex with named groups over URIs, e.g. 'store-(?P<store>[^/]+)/'."
)
@click.option("--out", default=None, help="Parquet file to write [default: DEST/counts.parquet]; '-' prints a table.")
@click.option("--min-score", type=float, default=0.0, show_default=True)
@options.storage_options
def counts(dest, pattern, out, min_score, storage_options) -> None:
    """Detections per group of images (from their URIs) and class."""
    from segbatch.outputs import CountsError, count_table
    from segbatch.storage import join

    storage = Storage(storage_options or {})
    try:
        table = count_table(dest, storage, pattern, min_score)
    except CountsError as exc:
        raise click.BadParameter(str(exc), param_hint="--by") from None
    if out == "-":
        click.echo(table.to_pandas().to_string(index=False))
        return
    out = out or join(dest, "counts.parquet")
    storage.write_parquet(table, out)
    click.echo(f"{table.num_rows} rows (group, class) written to {out}", err=True)


@click.command()
@click.argument("dest")
@click.option("--out", default=None, help="Where to write the page (path or URL) [default: ./NAME-report.html].")
@click.option("--overlays", type=int, default=4, show_default=True, help="Overlay pictures on the page.")
@click.option("--seed", type=int, default=0, help="Which sample of images gets overlays.")
@options.storage_options
def report(dest, out, overlays, seed, storage_options) -> None:
    """A single HTML page of DEST's results: counts per class, scores, keypoints, pace, errors, overlays."""
    from segbatch.outputs import write_report

    out = out or beside_here(dest, "-report.html")  # never into DEST: report only reads it
    _, s = write_report(dest, out, Storage(storage_options or {}), overlays=overlays, seed=seed)
    click.echo(
        f"{s.images:,} images, {s.detections:,} detections, {s.errors:,} errors: report written to {out}", err=True
    )


@click.command()
@click.argument("dest")
@click.option(
    "--iceberg",
    "table_name",
    required=True,
    help="The table: CATALOG.NAMESPACE.TABLE, or NAMESPACE.TABLE in the default catalog; created on first publish.",
)
@click.option(
    "--catalog-uri",
    default=None,
    help="The catalog's uri property (sqlite:///..., postgresql://..., http(s):// REST, thrift:// Hive) "
    "[default: from ~/.pyiceberg.yaml or PYICEBERG_CATALOG__<NAME>__URI].",
)
@click.option("--warehouse", default=None, help="The catalog's warehouse property (where new tables' metadata go).")
@click.option(
    "--catalog-property",
    "catalog_properties",
    multiple=True,
    metavar="KEY=VALUE",
    help="Any other catalog property (repeatable): type=glue, s3.endpoint=..., token=...",
)
@options.storage_options
def publish(dest, table_name, catalog_uri, warehouse, catalog_properties, storage_options) -> None:
    """Register DEST's Parquet files in an Iceberg table, without copying them.

    Each file once: publishing again, or after a later run added images to DEST,
    adds only the files the table lacks, in one snapshot. The catalog is
    configured the pyiceberg way (~/.pyiceberg.yaml, PYICEBERG_CATALOG__* variables),
    with the options here over it; --storage-options also reach pyiceberg's S3 access.
    """
    from segbatch.outputs import fileio_properties, open_catalog, parse_table_ref
    from segbatch.outputs import publish as publish_dest

    ref = parse_table_ref(table_name)
    properties = {**fileio_properties(storage_options), **catalog_property_pairs(catalog_properties)}
    properties.update({k: v for k, v in (("uri", catalog_uri), ("warehouse", warehouse)) if v})
    storage = Storage(storage_options or {})
    result = publish_dest(dest, storage, open_catalog(ref.catalog, properties), ref)
    made = "created, " if result.created else ""
    click.echo(
        f"{result.table}: {made}{len(result.added)} files added ({result.rows_added:,} rows), "
        f"{len(result.skipped)} already there; {result.table_rows:,} rows in the table",
        err=True,
    )


def catalog_property_pairs(pairs: tuple[str, ...]) -> dict[str, str]:
    """``KEY=VALUE`` texts as properties; one without ``=`` is a usage error."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--catalog-property")
        out[key.strip()] = value
    return out
