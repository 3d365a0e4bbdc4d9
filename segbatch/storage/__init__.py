"""Storage: every URL opened through fsspec with the user's storage options.

- ``files``: ``Storage``, the one object the rest of segbatch reads and writes through;
- ``filesystems``: the fsspec filesystem of a URL, its options, and the secrets among them;
- ``faults``: faults sorted into the object's own and the store's, and the retry policy;
- ``urls``: URLs and paths as text (protocols, joining, output names, names that are not UTF-8);
- ``durable``: local writes that a crash leaves old or whole;
- ``rasters``: raster reading through GDAL, the faults it hides brought back;
- ``sources``: listing the job's sources;
- ``stac``: a STAC Item, ItemCollection, Collection or Catalog as the source, each item's asset and id.
- ``inventory``: an S3 Inventory report (its manifest.json) as the source.
"""

from .faults import RetryPolicy, TooLarge, fault_kind, is_transient
from .files import Storage
from .filesystems import Filesystems
from .rasters import OpenRasters
from .sources import SourceError, list_sources
from .urls import OBJECT_STORES, is_local, join, local_path, local_uri, normalized, output_name, protocol

__all__ = [
    "OBJECT_STORES",
    "Filesystems",
    "OpenRasters",
    "RetryPolicy",
    "SourceError",
    "Storage",
    "TooLarge",
    "fault_kind",
    "is_local",
    "is_transient",
    "join",
    "list_sources",
    "local_path",
    "local_uri",
    "normalized",
    "output_name",
    "protocol",
]
