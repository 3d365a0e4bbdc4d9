"""DEST/objects as a GIS vector file (GeoPackage, GeoJSON, FlatGeobuf, Shapefile) through GDAL (pyogrio).

Why streamed: an archive's objects do not fit in memory, so the objects files are
read a record batch at a time (the RLE mask column never read) and handed to GDAL
as they come: one open dataset fed by an Arrow stream for a single layer, or appends
to a staging GeoPackage (one layer per class) that single-layer formats are then
copied from, layer by layer. Memory stays that of one batch whatever the object count,
but for the spatial indexes GDAL builds in memory (FlatGeobuf's, about 0.4 KB an object;
``spatial_index=False`` drops it).

Why one CRS: GeoParquet holds one CRS per file and DEST/objects has one file per
scene, so scenes in different UTM zones cannot share a layer as they are. Every
geometry is reprojected (pyproj, ``always_xy``: x east, y north whatever the CRS's
axis order) to one CRS: the one asked for, else the first scene's (by URI). Scenes without a
CRS (pixel coordinates) cannot be placed beside georeferenced ones: that is an error.

Why whole or absent: GDAL writes into a temporary folder (beside OUT when it is
local, so the final rename stays on one filesystem), and the finished files are
then renamed (or uploaded, for a remote OUT: GDAL cannot append through fsspec)
to their names, the main file last (``.shp`` after its ``.dbf``, ``.shx``...).

The attributes of each feature (all within Shapefile's 10-character names):
``uri`` (the scene), ``label``, ``label_name``, ``score``, ``area`` (mask pixels),
``map_area`` (the polygon's area in the squared units of the scene's own projected
CRS, m² for UTM; null when the scene's CRS is geographic or absent), and the box in
scene pixels as ``box_x1``, ``box_y1``, ``box_x2``, ``box_y2`` (to go back to the image).
The RLE mask is left out: the polygon is its outline.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from segbatch import schema
from segbatch.errors import SegbatchError, StorageFault, UsageError
from segbatch.storage import Storage, is_local, join

# format name -> (GDAL driver, extension, the files beside the main one that make it up)
FORMATS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "gpkg": ("GPKG", ".gpkg", ()),
    "geojson": ("GeoJSON", ".geojson", ()),
    "fgb": ("FlatGeobuf", ".fgb", ()),
    "shp": ("ESRI Shapefile", ".shp", (".dbf", ".shx", ".prj", ".cpg")),
}
_EXTENSIONS = {ext: name for name, (_, ext, _) in FORMATS.items()}
_READ_COLUMNS = ["uri", "label", "label_name", "score", "box", "area", "geometry"]
BATCH_ROWS = 8192
_INDEXED = ("GPKG", "FlatGeobuf")  # drivers that write a spatial index unless told not to
GEOMETRY_TYPE = "MultiPolygon"  # every outline promoted: one type per layer, as Shapefile and strict readers want

FEATURE_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("label", pa.int32()),
        ("label_name", pa.string()),
        ("score", pa.float32()),
        ("area", pa.int64()),
        ("map_area", pa.float64()),
        ("box_x1", pa.float32()),
        ("box_y1", pa.float32()),
        ("box_x2", pa.float32()),
        ("box_y2", pa.float32()),
        ("geometry", pa.binary()),
    ]
)


class VectorExportError(UsageError):
    """The export as asked cannot be written (an unknown format, scenes that cannot share a CRS)."""


def _pyogrio():
    """pyogrio, or how to install it: the vector exports are an extra (GDAL through pyogrio)."""
    try:
        import pyogrio
    except ImportError:
        raise VectorExportError(
            "vector exports need pyogrio: pip install 'segbatch[vector]' (or --coco for COCO JSON)"
        ) from None
    return pyogrio


class ObjectsFileError(SegbatchError):
    """An objects file under DEST/objects cannot be read as GeoParquet (damaged, or not segbatch's)."""


@dataclass(frozen=True)
class ObjectsFile:
    """One scene's objects file: its URL, object count, CRS (PROJJSON text; None: pixel coordinates)
    and scene (its URI, from the footer's statistics; the URL when they are missing)."""

    url: str
    rows: int
    crs: str | None
    scene: str = ""


@dataclass(frozen=True)
class ExportPlan:
    """What an export reads and the one CRS it writes in (``crs``: PROJJSON/WKT text, None: pixels).

    note: a line for the user when geometries are reprojected (scenes in several CRSs), else "".
    """

    files: tuple[ObjectsFile, ...]
    crs: str | None
    note: str = ""

    @property
    def objects(self) -> int:
        return sum(f.rows for f in self.files)


@dataclass
class ExportResult:
    """What an export wrote: the output URLs (one per class for single-layer formats
    with ``layer_per_class``), the layers and their feature counts."""

    outputs: list[str] = field(default_factory=list)
    layers: dict[str, int] = field(default_factory=dict)

    @property
    def features(self) -> int:
        return sum(self.layers.values())


# -- choices (pure) ----------------------------------------------------------------------------------


def format_of(out: str, fmt: str | None = None) -> str:
    """The format name of OUT: ``fmt`` when given, else from OUT's extension."""
    if fmt:
        if fmt not in FORMATS:
            raise VectorExportError(f"unknown vector format {fmt!r}: use one of {', '.join(FORMATS)}")
        return fmt
    ext = os.path.splitext(out.rstrip("/"))[1].lower()
    if ext in _EXTENSIONS:
        return _EXTENSIONS[ext]
    known = ", ".join(sorted(_EXTENSIONS))
    raise VectorExportError(
        f"cannot tell the format of {out!r} from its extension: name it {known}, "
        f"or pass --format ({', '.join(FORMATS)})"
    )


def layer_name(label_name: str | None, label: int | None) -> str:
    """A class's layer (or file suffix) name: its class name made safe for file names and SQL,
    ``label_<id>`` when the model gave none."""
    text = label_name if label_name else f"label_{label}"
    return re.sub(r"[^0-9A-Za-z_-]+", "_", text).strip("_") or f"label_{label}"


def class_output(out: str, fmt: str, name: str) -> str:
    """A class's own file for single-layer formats: OUT's stem + ``_`` + the class (``roofs_car.fgb``)."""
    stem, ext = os.path.splitext(out)
    return f"{stem}_{name}{ext or FORMATS[fmt][1]}"


def crs_of_geo(geo: bytes | None) -> str | None:
    """The CRS (PROJJSON text) of a GeoParquet ``geo`` metadata; None for an explicit null (pixels).

    A file without the metadata or the ``crs`` key is OGC:CRS84, as GeoParquet says."""
    from pyproj import CRS

    if not geo:
        return CRS("OGC:CRS84").to_json()
    meta = json.loads(geo)
    column = meta["columns"][meta.get("primary_column", "geometry")]
    if "crs" not in column:
        return CRS("OGC:CRS84").to_json()
    return None if column["crs"] is None else json.dumps(column["crs"])


def choose_crs(files: list[ObjectsFile], requested: str | None = None) -> tuple[str | None, str]:
    """The one CRS to write in, and a note for the user when scenes are reprojected to it.

    Files without objects do not count (an unreadable scene's file has no CRS). Pixel
    scenes beside georeferenced ones, or a CRS asked for pixel scenes, are errors:
    pixels have no place on a map.
    """
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    with_objects = [f for f in files if f.rows]
    pixel = [f for f in with_objects if f.crs is None]
    placed = [f for f in with_objects if f.crs is not None]
    if pixel and (placed or requested):
        why = f"{len(placed)} scenes have a CRS" if placed else f"--crs {requested} was asked"
        raise VectorExportError(
            f"{len(pixel)} scenes have no CRS (pixel coordinates; the first: {pixel[0].url}) and {why}: "
            "pixel coordinates cannot be reprojected. Export the georeferenced scenes and the others apart "
            "(copy their objects files into two folders), or georeference the rasters and run again"
        )
    if requested:
        try:
            target = CRS.from_user_input(requested)
        except CRSError as exc:
            raise VectorExportError(
                f"--crs {requested!r} is not a CRS pyproj knows ({exc}); use e.g. EPSG:4326"
            ) from None
        moved = [f for f in placed if CRS.from_user_input(f.crs) != target]
        note = f"{len(moved)} of {len(placed)} scenes reprojected to {_crs_name(target)} (--crs)" if moved else ""
        return target.to_json(), note
    if not placed:
        return None, ""
    first = CRS.from_user_input(placed[0].crs)
    distinct = {CRS.from_user_input(f.crs) for f in placed}
    if len(distinct) == 1:
        return placed[0].crs, ""
    note = (
        f"the scenes are in {len(distinct)} CRSs: every geometry reprojected to {_crs_name(first)}, "
        f"the first scene's ({placed[0].scene or placed[0].url}); --crs chooses another"
    )
    return placed[0].crs, note


def _crs_name(crs) -> str:
    code = crs.to_authority()
    return f"{code[0]}:{code[1]}" if code else crs.name


def features(batch: pa.RecordBatch | pa.Table, source_crs: str | None, target_crs: str | None) -> pa.Table:
    """An objects batch (``schema.OBJECT_SCHEMA``, mask left out) as features (``FEATURE_SCHEMA``),
    geometries as MultiPolygons reprojected from ``source_crs`` to ``target_crs``."""
    import shapely

    geoms = shapely.from_wkb(batch.column("geometry").to_numpy(zero_copy_only=False))
    map_area = np.full(len(geoms), np.nan)
    projected = source_crs is not None and _crs(source_crs).is_projected
    if projected:
        map_area = shapely.area(geoms)
    if source_crs is not None and target_crs is not None and _crs(source_crs) != _crs(target_crs):
        transformer = _transformer(source_crs, target_crs)
        geoms = shapely.transform(geoms, lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1])))
    single = shapely.get_type_id(geoms) == shapely.GeometryType.POLYGON
    if single.any():
        geoms[single] = shapely.multipolygons(geoms[single], indices=np.arange(int(single.sum())))
    corners = _corners(batch.column("box"))
    columns = {
        "uri": batch.column("uri"),
        "label": batch.column("label"),
        "label_name": batch.column("label_name"),
        "score": batch.column("score"),
        "area": batch.column("area"),
        "map_area": pa.array(map_area, pa.float64(), mask=None if projected else np.ones(len(geoms), bool)),
        "box_x1": corners[:, 0],
        "box_y1": corners[:, 1],
        "box_x2": corners[:, 2],
        "box_y2": corners[:, 3],
        "geometry": shapely.to_wkb(geoms),
    }
    return pa.Table.from_pydict(columns, schema=FEATURE_SCHEMA)


def _corners(box: pa.Array) -> np.ndarray:
    """The boxes (fixed lists of 4) as an [n, 4] float32 array; NaN for a box that is null."""
    corners = np.full((len(box), 4), np.nan, np.float32)
    valid = ~np.asarray(box.is_null().to_numpy(zero_copy_only=False), bool)
    if valid.any():
        flat = pc.list_flatten(box.filter(pa.array(valid))).to_numpy(zero_copy_only=False)
        corners[valid] = flat.reshape(-1, 4)
    return corners


@functools.lru_cache(maxsize=64)
def _crs(text: str):
    """A CRS parsed once per text: every batch of a scene asks again."""
    from pyproj import CRS

    return CRS.from_user_input(text)


@functools.lru_cache(maxsize=64)
def _transformer(source: str, target: str):
    """x east, y north in and out (``always_xy``), whatever axis order the CRSs declare (EPSG:4326: lat first)."""
    from pyproj import Transformer

    return Transformer.from_crs(_crs(source), _crs(target), always_xy=True)


# -- reading DEST/objects ---------------------------------------------------------------------------


def plan_export(dest: str, storage: Storage, crs: str | None = None) -> ExportPlan:
    """The objects files of DEST (only their footers read) and the CRS the export writes in."""
    _pyogrio()  # before any reading: a missing extra is the first thing to say
    folder = join(dest, schema.OBJECTS)
    if not storage.exists(folder):
        raise VectorExportError(
            f"{dest} holds no objects (no {schema.OBJECTS}/ folder): vector exports are of tiled rasters' "
            f"objects; run `segbatch run SOURCE {dest} --tile-size N` on GeoTIFFs first, or use --coco"
        )
    files = []
    for url in storage.list_files(folder):
        if not url.endswith(".parquet"):
            continue
        meta = storage.read_parquet_metadata(url)
        geo = (meta.schema.to_arrow_schema().metadata or {}).get(schema.GEO_METADATA_KEY)
        files.append(ObjectsFile(url, meta.num_rows, crs_of_geo(geo), _scene_of(meta) or url))
    files.sort(key=lambda f: (f.scene, f.url))  # "the first scene" is the first URI, not a file name's hash
    target, note = choose_crs(files, crs)
    return ExportPlan(tuple(files), target, note)


def _scene_of(meta: pq.FileMetaData) -> str | None:
    """The scene of an objects file (one scene a file) from its ``uri`` column's statistics: no data read."""
    if meta.num_row_groups == 0 or meta.num_rows == 0:
        return None
    group = meta.row_group(0)
    columns = [group.column(i) for i in range(group.num_columns)]  # leaf columns: box and mask have several
    stats = next((c.statistics for c in columns if c.path_in_schema == "uri"), None)
    return stats.min if stats is not None and stats.has_min_max and stats.min == stats.max else None


def iter_features(
    plan: ExportPlan, storage: Storage, on_file: Callable[[ObjectsFile], None] | None = None
) -> Iterator[pa.Table]:
    """The plan's objects as feature tables in the plan's CRS, a record batch at a time."""
    for f in plan.files:
        if f.rows:
            try:
                with storage.open(f.url) as fh:
                    for batch in pq.ParquetFile(fh).iter_batches(batch_size=BATCH_ROWS, columns=_READ_COLUMNS):
                        yield features(batch, f.crs, plan.crs)
            except StorageFault:
                raise
            except (pa.ArrowException, OSError, ValueError) as exc:
                raise ObjectsFileError(
                    f"{f.url} cannot be read ({exc}); nothing was written. Rerun `segbatch run` on this DEST "
                    "to write it again, or move it out of objects/ to export the rest"
                ) from exc
        if on_file is not None:
            on_file(f)


# -- writing ----------------------------------------------------------------------------------------


def export_vector(
    plan: ExportPlan,
    out: str,
    storage: Storage,
    fmt: str | None = None,
    layer_per_class: bool = False,
    on_file: Callable[[ObjectsFile], None] | None = None,
    spatial_index: bool = True,
) -> ExportResult:
    """Write the plan's objects to OUT (a path or URL) in ``fmt`` (default: from OUT's extension).

    One layer named after OUT's stem; or, with ``layer_per_class``, a layer per class
    name in a GeoPackage, and for the single-layer formats one file per class
    (``class_output``: OUT's stem + ``_`` + the class). Every file appears whole or not at all.

    spatial_index: GeoPackage's R-tree and FlatGeobuf's packed Hilbert R-tree. GDAL builds
    FlatGeobuf's in memory (about 0.4 KB an object): without it, memory stays flat however many.
    """
    fmt = format_of(out, fmt)
    driver, ext, _ = FORMATS[fmt]
    stem = os.path.splitext(os.path.basename(out.rstrip("/")))[0] or "objects"
    target = storage.fs(out)[1] if is_local(out) else out  # a local OUT as a plain path (file:// too)
    local_dir = os.path.dirname(target) if is_local(out) else None
    if local_dir:
        os.makedirs(local_dir, exist_ok=True)
    result = ExportResult()
    crs = _gdal_crs(plan.crs)
    with tempfile.TemporaryDirectory(prefix=".segbatch-export-", dir=local_dir) as tmp:
        staged: list[tuple[str, str]] = []  # (local file, final URL)
        if not layer_per_class:
            path = os.path.join(tmp, stem + ext)
            counted = _Counted(iter_features(plan, storage, on_file))
            try:
                _write_stream(counted, path, stem, driver, crs, index=spatial_index)
            except Exception:
                if counted.error is not None:
                    raise counted.error from None
                raise
            result.layers[stem] = counted.rows
            staged.append((path, target))
        else:
            staging = os.path.join(tmp, stem + ".gpkg")
            # the staging file of a single-layer format is only read through once: no spatial index to keep up
            index = fmt == "gpkg" and spatial_index
            layers = _write_by_class(iter_features(plan, storage, on_file), staging, crs, index=index)
            result.layers.update(layers)
            if fmt == "gpkg":
                staged.append((staging, target))
            else:
                pyogrio = _pyogrio()
                for name in layers:
                    path = os.path.join(tmp, f"{stem}_{name}{ext}")
                    with pyogrio.open_arrow(staging, layer=name, batch_size=BATCH_ROWS, use_pyarrow=True) as (
                        meta,
                        reader,
                    ):
                        geometry = meta["geometry_name"] or "geometry"
                        _write_stream(reader, path, name, driver, crs, geometry, index=spatial_index)
                    staged.append((path, class_output(target, fmt, name)))
        for path, url in staged:
            _publish(path, url, fmt, storage)
            result.outputs.append(url)
    return result


def _gdal_crs(crs: str | None) -> str | None:
    """The CRS as WKT for GDAL (which reads PROJJSON too, but WKT everywhere)."""
    return None if crs is None else _crs(crs).to_wkt()


class _Counted:
    """An iterator of feature tables that counts the rows it passed on, and keeps the
    error that stopped it: GDAL, pulling the stream, reports only that the stream failed."""

    def __init__(self, tables: Iterator[pa.Table]):
        self.tables, self.rows, self.error = tables, 0, None

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        try:
            for table in self.tables:
                self.rows += table.num_rows
                yield from table.to_batches()
        except Exception as exc:
            self.error = exc
            raise


def _write_stream(
    batches, path: str, layer: str, driver: str, crs: str | None, geometry: str = "geometry", index: bool = True
) -> None:
    """Write a stream of feature batches as one layer: GDAL keeps the dataset open and takes them as they come."""
    pyogrio = _pyogrio()
    reader = (
        batches
        if isinstance(batches, pa.RecordBatchReader)
        else pa.RecordBatchReader.from_batches(FEATURE_SCHEMA, iter(batches))
    )
    pyogrio.write_arrow(
        reader,
        path,
        layer=layer,
        driver=driver,
        geometry_name=geometry,
        geometry_type=GEOMETRY_TYPE,
        crs=crs,
        encoding="UTF-8" if driver == "ESRI Shapefile" else None,
        layer_options=None if index or driver not in _INDEXED else {"SPATIAL_INDEX": "NO"},
    )


def _write_by_class(tables: Iterator[pa.Table], path: str, crs: str | None, index: bool = True) -> dict[str, int]:
    """Append features to their class's layer of a GeoPackage; returns the count per layer.

    Classes' rows are held back until ``BATCH_ROWS`` of them wait (all classes together), then
    appended a layer each: memory stays one batch's, and GDAL opens the file once per batch
    rather than once per scene and class (each open and close costs tens of ms).
    """
    layers: dict[str, int] = {}
    waiting: dict[str, list[pa.Table]] = {}
    held = 0
    for table in tables:
        names = [layer_name(n, k) for n, k in zip(table["label_name"].to_pylist(), table["label"].to_pylist())]
        keys = pa.array(names, pa.string())
        for name in sorted(set(names)):
            waiting.setdefault(name, []).append(table.filter(pc.equal(keys, name)))
        held += table.num_rows
        if held >= BATCH_ROWS:
            _append_layers(waiting, path, crs, layers, index)
            held = 0
    _append_layers(waiting, path, crs, layers, index)
    return layers


def _append_layers(
    waiting: dict[str, list[pa.Table]], path: str, crs: str | None, layers: dict[str, int], index: bool
) -> None:
    pyogrio = _pyogrio()
    for name, parts in sorted(waiting.items()):
        part = pa.concat_tables(parts)
        pyogrio.write_arrow(
            part,
            path,
            layer=name,
            driver="GPKG",
            geometry_name="geometry",
            geometry_type=GEOMETRY_TYPE,
            crs=crs,
            append=os.path.exists(path),
            layer_options=None if index else {"SPATIAL_INDEX": "NO"},
        )
        layers[name] = layers.get(name, 0) + part.num_rows
    waiting.clear()


def _publish(path: str, url: str, fmt: str, storage: Storage) -> None:
    """Put a finished local file (and its sidecars, before it) at ``url``: a rename when local, else an upload."""
    stem, ext = os.path.splitext(path)
    final_stem = os.path.splitext(url)[0]
    parts = [(stem + side, final_stem + side) for side in FORMATS[fmt][2] if os.path.exists(stem + side)]
    parts.append((path, url))  # the main file last: when it is there, so is the rest
    for src, dst in parts:
        if is_local(dst):
            os.replace(src, dst)  # same folder, so one filesystem: atomic
        else:
            storage.upload_file(src, dst)
