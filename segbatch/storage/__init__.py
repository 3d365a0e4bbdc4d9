"""Storage: every URL opened through fsspec with the user's storage options, faults sorted into
the object's own and the store's, retries, raster reading, and listing the job's sources.
"""

from .core import OBJECT_STORES, OpenRasters, Storage, TooLarge, fault_kind, is_local, is_transient, join, local_path, local_uri, output_name, protocol
from .sources import SourceError, list_sources

__all__ = ["OBJECT_STORES", "OpenRasters", "SourceError", "Storage", "TooLarge", "fault_kind", "is_local", "is_transient", "join", "list_sources", "local_path", "local_uri", "output_name", "protocol"]
