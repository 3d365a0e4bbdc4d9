"""segbatch: batch instance segmentation of image archives with Mask R-CNN on Ray.

From Python (see :mod:`segbatch.api`)::

    result = segbatch.run(source, dest, model="coco")
    table = segbatch.read_results(dest)
"""

__version__ = "0.1.0"

from segbatch.config import JobConfig, ModelConfig  # noqa: E402  (light: no torch, no Ray)
from segbatch.errors import SegbatchError  # noqa: E402
from segbatch.lazy import lazy_names  # noqa: E402

# run, read_results and JobResult import the engine (Ray, torch) when first used, so
# `import segbatch` and the command line start fast.
_LAZY = {
    "run": "segbatch.api",
    "read_results": "segbatch.api",
    "job_config": "segbatch.api",
    "JobResult": "segbatch.engine",
}


__getattr__ = lazy_names(__name__, _LAZY)


__all__ = ["JobConfig", "JobResult", "ModelConfig", "SegbatchError", "__version__", "job_config", "read_results", "run"]
