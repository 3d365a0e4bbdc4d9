"""Large georeferenced scenes, one module a step: the tile grid (``grid``), reading tiles
(``read``), a tile's detections as pieces (``pieces``), stitching them across seams
(``stitch``), georeferencing (``georef``), the scene's outputs (``scene``), and the objects'
polygons (``objects``, through the rules of ``polygons``) for tiled scenes and whole GeoTIFFs alike.
"""

from .georef import geo_metadata, instance_polygon
from .grid import TILE_MARK, TileOptions, Window, parse_tile_item, plan_windows, tile_item
from .objects import Georef, image_object_tables, is_tiff, read_georef
from .pieces import Instance, Piece, crop_record, tile_detections, tile_pieces
from .polygons import Measure, PolygonOptionError, PolygonOptions, check_crs, parse_measure
from .read import BandsError, RasterInfo, model_bands, raster_info, read_tile, tile_peak_bytes, to_8bit
from .scene import object_table, scene_instances, scene_row, unreadable_object_table, write_class_map
from .stitch import stitch_instances

__all__ = [
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
    "Instance",
    "Piece",
    "RasterInfo",
    "TILE_MARK",
    "TileOptions",
    "Window",
    "crop_record",
    "geo_metadata",
    "instance_polygon",
    "model_bands",
    "object_table",
    "parse_tile_item",
    "plan_windows",
    "raster_info",
    "read_tile",
    "scene_instances",
    "scene_row",
    "stitch_instances",
    "tile_detections",
    "tile_item",
    "tile_peak_bytes",
    "tile_pieces",
    "to_8bit",
    "unreadable_object_table",
    "write_class_map",
]
