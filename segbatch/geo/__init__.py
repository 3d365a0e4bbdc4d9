"""Large georeferenced scenes: the tile grid, reading tiles, stitching instances across seams,
georeferencing and the scene outputs.
"""

from .tiles import BandsError, Instance, Piece, RasterInfo, TILE_MARK, TileOptions, Window, crop_record, geo_metadata, instance_polygon, merge_scene, parse_tile_item, plan_windows, raster_info, read_tile, tile_detections, tile_item, tile_peak_bytes, tile_pieces, to_8bit, write_class_map

__all__ = ["BandsError", "Instance", "Piece", "RasterInfo", "TILE_MARK", "TileOptions", "Window", "crop_record", "geo_metadata", "instance_polygon", "merge_scene", "parse_tile_item", "plan_windows", "raster_info", "read_tile", "tile_detections", "tile_item", "tile_peak_bytes", "tile_pieces", "to_8bit", "write_class_map"]
