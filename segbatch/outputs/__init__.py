"""Reading a finished DEST: results, counts, evaluation, overlays, the HTML report, vector
exports of its objects (``vector``, with the ``vector`` extra), and
publishing it as an Iceberg table (``publish``, with the ``iceberg`` extra).
Reads through :mod:`segbatch.schema`, never the job's internals.
"""

from .counts import CountsError, compile_groups, count_table
from .evaluation import EvaluationError, coco_results, evaluate, match_images
from .publish import PublishError, PublishResult, TableRef, fileio_properties, open_catalog, parse_table_ref, publish
from .render import decode_mask, pick_uris, render_rows
from .report import write_report
from .results import KeypointLayout, iter_batches, keypoint_layout, read_results, read_rows, results_dataset
from .vector import ExportPlan, ExportResult, ObjectsFileError, VectorExportError, export_vector, plan_export

__all__ = [
    "CountsError",
    "EvaluationError",
    "coco_results",
    "compile_groups",
    "count_table",
    "decode_mask",
    "evaluate",
    "match_images",
    "pick_uris",
    "PublishError",
    "PublishResult",
    "TableRef",
    "fileio_properties",
    "open_catalog",
    "parse_table_ref",
    "publish",
    "iter_batches",
    "KeypointLayout",
    "keypoint_layout",
    "read_results",
    "read_rows",
    "results_dataset",
    "render_rows",
    "write_report",
    "ExportPlan",
    "ExportResult",
    "ObjectsFileError",
    "VectorExportError",
    "export_vector",
    "plan_export",
]
