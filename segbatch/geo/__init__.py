"""Large georeferenced scenes, one module a step: the tile grid (``grid``), reading tiles
(``read``), where a scene has data and meets the area of interest (``coverage``, ``aoi``),
a tile's detections as pieces (``pieces``), stitching them across seams
(``stitch``), georeferencing (``georef``), the scene's outputs (``scene``), and the objects'
polygons (``objects``, through the rules of ``polygons``) for tiled scenes and whole GeoTIFFs alike.
"""

from .aoi import AoiError, Area, area_in_pixels, load_area, parse_bbox
from .coverage import (
    SceneCoverage,
    cut_to_data,
    instances_in_area,
    mask_cells,
    scene_coverage,
    windows_in_area,
    windows_with_data,
)
from .georef import geo_metadata, instance_polygon
from .grid import TILE_MARK, TileOptions, Window, parse_tile_item, plan_windows, tile_item
from .objects import Georef, image_object_tables, is_tiff, read_georef
from .pieces import DATA_MASK, Instance, Piece, crop_record, tile_detections, tile_pieces
from .polygons import Measure, PolygonOptionError, PolygonOptions, check_crs, parse_measure
from .read import (
    BandsError,
    RasterInfo,
    model_bands,
    raster_info,
    read_data_cells,
    read_tile,
    read_tile_data,
    tile_peak_bytes,
    to_8bit,
)
from .scene import object_table, scene_instances, scene_row, unreadable_object_table, write_class_map
from .stitch import stitch_instances

__all__ = [
    "AoiError",
    "Area",
    "BandsError",
    "Georef",
    "Measure",
    "PolygonOptionError",
    "PolygonOptions",
    "check_crs",
    "image_object_tables",
    "is_tiff",
    "parse_measure",
    "read_georef",
    "DATA_MASK",
    "Instance",
    "Piece",
    "RasterInfo",
    "SceneCoverage",
    "TILE_MARK",
    "TileOptions",
    "Window",
    "area_in_pixels",
    "crop_record",
    "cut_to_data",
    "geo_metadata",
    "instance_polygon",
    "instances_in_area",
    "load_area",
    "mask_cells",
    "model_bands",
    "object_table",
    "parse_bbox",
    "parse_tile_item",
    "plan_windows",
    "raster_info",
    "read_data_cells",
    "read_tile",
    "read_tile_data",
    "scene_coverage",
    "scene_instances",
    "scene_row",
    "stitch_instances",
    "tile_detections",
    "tile_item",
    "tile_peak_bytes",
    "tile_pieces",
    "to_8bit",
    "unreadable_object_table",
    "windows_in_area",
    "windows_with_data",
    "write_class_map",
]
