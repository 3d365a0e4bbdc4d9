"""The job's typed, validated configuration.

``ModelConfig`` (the model and how its outputs become rows), ``JobConfig``
(where and how the job runs) and ``TrainConfig`` (a training run). The
command line builds its options from these fields (``cli/options.py``). The result key (``result_key``
over ``ModelSpec.result_fields`` and ``JobConfig.result_fields``) is what a
DEST remembers, so a resumed job cannot mix rows made two ways: every option
that can change a row is in it, and each one left out says why it cannot.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from segbatch.errors import UsageError

PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
BUILTIN_MODELS = ("coco", "coco-v2", "keypoint-coco", "demo", "random", "keypoint-random")
ARCHITECTURES = ("resnet50_fpn", "resnet50_fpn_v2", "demo", "keypoint_resnet50_fpn")  # what model/arch.py builds
DECODERS = ("auto", "cpu", "gpu")  # where JPEGs are decoded: auto is the GPU when the worker has one
PROGRESS_MODES = ("auto", "bar", "lines", "none")


class ConfigError(UsageError, ValueError):
    """A configuration value is wrong; the message names the option and the fix."""


@dataclass(frozen=True)
class ModelConfig:
    """What the model is and how its outputs become rows.

    model: ``coco``, ``coco-v2``, ``keypoint-coco`` (torchvision's COCO person
    keypoints), ``demo``, ``random`` (seeded random weights, for tests and
    offline smoke runs) or a path/URI of a state_dict checkpoint.
    """

    model: str = "demo"
    classes: str | None = None
    keypoints: str | None = None  # a Keypoint R-CNN checkpoint's keypoint names: a file, one a line
    score_threshold: float = 0.5
    mask_threshold: float = 0.5
    max_detections: int = 100
    min_size: int | None = None  # None: the model's own (800/1333 for COCO)
    max_size: int | None = None
    precision: str = "fp32"
    force_precision: bool = False  # bf16 even on a CPU without native bf16 (model/precision.py)
    device: str = "auto"
    seed: int = 0  # only for model="random"

    def __post_init__(self) -> None:
        _check(0.0 <= self.score_threshold <= 1.0, "--score-threshold must be within [0, 1]")
        _check(0.0 <= self.mask_threshold < 1.0, "--mask-threshold must be within [0, 1)")
        _check(self.max_detections >= 1, "--max-detections must be at least 1")
        _check(self.min_size is None or self.min_size >= 32, "--min-size must be at least 32 pixels")
        _check(self.max_size is None or self.max_size >= 32, "--max-size must be at least 32 pixels")
        _check(
            self.min_size is None or self.max_size is None or self.max_size >= self.min_size,
            "--max-size must be at least --min-size",
        )
        _check(self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}")
        _check(self.device in DEVICES, f"--device must be one of {', '.join(DEVICES)}")

    def result_fields(self) -> dict[str, Any]:
        """This config's part of the result key (``ModelSpec.result_fields`` adds
        what the model resolves to: weights hash, class names, sizes).

        In: the thresholds, max_detections, min/max_size and precision (bf16
        and fp16 change masks). Out: ``model``, ``classes``, ``keypoints`` and ``seed`` name
        where the weights and class (keypoint) names come from: the same weights under
        another path or URI make the same rows, so the key holds the weights'
        hash and the names instead (``random``'s seed is in its hash).
        ``device``: CPU and GPU kernels round apart in the last bits, never
        in what a row says; nor ``force_precision`` (where it changes the
        precision that runs, the key holds the precision asked for).
        """
        d = dataclasses.asdict(self)
        for name in ("model", "classes", "keypoints", "seed", "device", "force_precision"):
            d.pop(name)
        return d


@dataclass(frozen=True)
class JobConfig:
    source: str
    dest: str
    model: ModelConfig = field(default_factory=ModelConfig)
    shard_size: int = 64
    workers: int = 0  # 0: as many as the cluster's GPUs (or CPUs) allow
    gpus_per_worker: float = 1.0
    # 0: beside a GPU its share of the node's CPUs (1 to 8), else up to 4 for the model's threads
    cpus_per_worker: float = 0.0
    batch_size: int = 2
    retries: int = 3
    io_threads: int = 4
    # None: the worker's CPUs less 2 (at least 2) beside a GPU, 0 (a thread) on CPUs
    encode_processes: int | None = None
    decode: str = "auto"  # one of DECODERS
    io_retries: int = 5
    address: str | None = None
    # the autoscaler's cluster config (ray up's YAML, a RayCluster/RayJob), read to size the pool
    autoscaling_config: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    max_pixels: int = 178_956_970  # Pillow's error limit: 2x its bomb warning
    max_bytes: int = 512 * 1024 * 1024
    stall_timeout_s: float = 600.0
    startup_timeout_s: float = 300.0
    overwrite: bool = False
    progress: str = "auto"  # one of PROGRESS_MODES
    # large rasters (geo/): 0 segments each image whole
    tile_size: int = 0
    tile_overlap: int = 64
    bands: tuple[int, ...] | None = None  # 1-based bands for R, G, B (or one band for all three)
    scale: tuple[float, float] | None = None  # samples mapped to 0..255; None: each band's min..max
    semantic_out: str | None = None  # a folder (path or URL) for per-input class maps
    aoi: str | None = None  # area of interest: minlon,minlat,maxlon,maxlat, or a vector file (path or URL)
    count_by: str | None = None  # a regex with named groups over URIs: DEST/counts.parquet per group and class
    stac_asset: str = "visual"  # a STAC SOURCE: the asset of each item that is its image
    # DEST/objects' polygons (geo/polygons.py): one CRS for all (EPSG:4326, ...; None: each raster's own), and
    # --simplify / --min-area as given: "0.5" in the raster's CRS units (m, m2 for UTM) or "2px" in pixels
    objects_crs: str | None = None
    simplify: str | None = None
    min_area: str | None = None

    def __post_init__(self) -> None:
        _check(bool(self.source), "SOURCE is empty")
        _check(bool(self.dest), "DEST is empty")
        _check(bool(self.stac_asset), "--stac-asset is empty: give an asset key of the STAC items, e.g. visual")
        _check(self.shard_size >= 1, "--shard-size must be at least 1")
        _check(self.workers >= 0, "--workers must be 0 (automatic) or more")
        _check(self.gpus_per_worker >= 0, "--gpus-per-worker must be 0 or more")
        _check(self.cpus_per_worker >= 0, "--cpus-per-worker must be 0 (automatic) or more")
        _check(self.io_threads >= 1, "--io-threads must be at least 1")
        _check(self.encode_processes is None or self.encode_processes >= 0, "--encode-processes must be 0 or more")
        _check(self.decode in DECODERS, f"--decode must be one of {', '.join(DECODERS)}")
        _check(self.batch_size >= 1, "--batch-size must be at least 1")
        _check(self.retries >= 0, "--retries must be 0 or more")
        _check(self.max_pixels >= 1, "--max-pixels must be at least 1")
        _check(self.stall_timeout_s > 0, "--stall-timeout must be more than 0 seconds")
        _check(self.startup_timeout_s > 0, "--startup-timeout must be more than 0 seconds")
        _check(self.progress in PROGRESS_MODES, f"--progress must be one of {', '.join(PROGRESS_MODES)}")
        _check(isinstance(self.storage_options, dict), "--storage-options must be a JSON object")
        _check(self.tile_size == 0 or self.tile_size >= 32, "--tile-size must be 0 (no tiling) or at least 32 pixels")
        _check(
            self.tile_size == 0 or 0 <= self.tile_overlap < self.tile_size,
            "--tile-overlap must be at least 0 and less than --tile-size",
        )
        _check(
            self.bands is None
            or (len(self.bands) in (1, 3) and all(isinstance(b, int) and b >= 1 for b in self.bands)),
            "--bands takes one band or three (1-based), e.g. --bands 4,3,2",
        )
        _check(
            self.scale is None or (len(self.scale) == 2 and self.scale[0] < self.scale[1]),
            "--scale takes LOW,HIGH with LOW < HIGH",
        )
        _check(
            self.tile_size > 0 or (self.bands is None and self.scale is None),
            "--bands and --scale apply to tiled rasters: add --tile-size",
        )
        if self.objects_crs is not None or self.simplify is not None or self.min_area is not None:
            self.polygon_options().crs_wkt  # noqa: B018 - a CRS pyproj does not know is refused now, naming the fix
        _check(self.aoi is None or self.tile_size > 0, "--aoi applies to tiled rasters: add --tile-size")
        if self.aoi is not None:
            from segbatch.geo.aoi import AoiError, parse_bbox

            try:  # a bbox is checked now; a file is read when the plan is made
                parse_bbox(self.aoi)
            except AoiError as exc:
                raise ConfigError(str(exc)) from None
        if self.count_by is not None:
            from segbatch.outputs import CountsError, compile_groups

            try:
                compile_groups(self.count_by)
            except CountsError as exc:
                raise ConfigError(str(exc)) from None

    def result_fields(self) -> dict[str, Any]:
        """The run options in the result key: those that can change a row.

        In: ``batch_size`` (images of a batch are padded to one size, which
        moves the model's outputs), ``decode`` (GPU and CPU JPEG decoders
        differ in pixels), ``max_pixels`` and ``max_bytes`` (which images
        become error rows), ``semantic_out`` (whether and where class maps
        are written beside the rows), the tiling (``tiling_fields``) and the
        polygon options (``polygon_fields``: DEST/objects must stay one CRS).
        Out, as they cannot change a row: source (a rerun over a grown
        prefix adds images; each image's row is its own), dest, shard_size
        (a rerun keeps the recorded plan; new shards only group new images),
        workers, gpus/cpus_per_worker, io_threads, encode_processes, address, autoscaling_config,
        progress, retries, io_retries, the timeouts (where and how fast it
        runs, how often it retries), storage_options (how to reach storage:
        credentials), overwrite (an action), count_by (counts.parquet is
        recomputed from all of data/ at the end of each run), stac_asset (it
        picks the source's images, as source does).
        """
        return {
            "batch_size": self.batch_size,
            "decode": self.decode,
            "max_pixels": self.max_pixels,
            "max_bytes": self.max_bytes,
            "semantic_out": self.semantic_out.rstrip("/") if self.semantic_out else None,
            **self.tiling_fields(),
            **self.polygon_fields(),
        }

    def tiling_fields(self) -> dict[str, Any]:
        """The tiling choices, which change the rows as the model's do (part of the result key)."""
        if not self.tile_size:
            return {}
        return {
            "tile_size": self.tile_size,
            "tile_overlap": self.tile_overlap,
            "bands": list(self.bands) if self.bands else None,
            "scale": list(self.scale) if self.scale else None,
            **({"aoi": self.aoi} if self.aoi else {}),  # absent without one: older DESTs keep their key
        }

    def polygon_fields(self) -> dict[str, Any]:
        """The polygon options given (part of the result key: they change DEST/objects, and a DEST
        whose objects mix two CRSs no longer reads as one layer); none given adds nothing."""
        names = ("objects_crs", "simplify", "min_area")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def polygon_options(self):
        """``geo.PolygonOptions`` of ``--objects-crs``, ``--simplify`` and ``--min-area`` (parsed and checked)."""
        from segbatch.geo.polygons import PolygonOptions, parse_measure

        simplify = parse_measure(self.simplify, "--simplify")
        min_area = parse_measure(self.min_area, "--min-area")
        _check(simplify is None or simplify.value > 0, "--simplify must be more than 0 (leave it out for none)")
        return PolygonOptions(self.objects_crs, simplify, min_area)

    def to_json(self) -> dict[str, Any]:
        """The config as recorded under DEST/_segbatch (no storage options:
        they may carry credentials)."""
        d = dataclasses.asdict(self)
        d.pop("storage_options")
        return d


def result_key(result_fields: dict[str, Any]) -> str:
    """A short hash of everything that determines the rows (model, weights,
    thresholds, sizes): a DEST made with another key is refused on resume."""
    blob = json.dumps(result_fields, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def describe_change(before: dict[str, Any], after: dict[str, Any]) -> str:
    """The result fields that differ, as ``name: old -> new`` (for the message
    that refuses a resume); long values (class lists) are cut short."""

    def short(value: Any) -> str:
        text = "(not set)" if value is None else str(value)
        return text if len(text) <= 60 else text[:57] + "..."

    names = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    return ", ".join(f"{k}: {short(before.get(k))} -> {short(after.get(k))}" for k in names)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


class TrainError(UsageError, ValueError):
    """The training run cannot be set up as asked; the message says what to change."""


@dataclass
class TrainConfig:
    """What :func:`~segbatch.train.train` and :func:`~segbatch.train.train_distributed` need.

    ``workers`` is the number of Ray Train workers (``train_distributed``
    only); ``loader_workers`` the DataLoader processes of each.
    """

    data: str  # path/URL of the COCO ground-truth JSON
    out: str  # path/URL of the checkpoint to write
    arch: str | None = None  # None: the --init checkpoint's, else "demo"
    epochs: int = 10
    batch_size: int = 4
    lr: float = 6e-4  # AdamW peak learning rate
    min_size: int = 256
    max_size: int = 320
    workers: int = 1
    use_gpu: bool = False
    seed: int = 0
    init: str | None = None  # checkpoint to start from
    weight_decay: float = 1e-4
    warmup_steps: int = 300
    clip_grad_norm: float = 5.0
    max_steps: int | None = None  # stop early (tests, smoke runs)
    time_budget_s: float | None = None  # fit the run (and its learning-rate schedule) into this many seconds
    loader_workers: int = 0
    hflip: bool = True  # random horizontal flips while training
    checkpoint_every: int = 0  # steps; 0: at the end of each epoch only
    half: bool = False  # store float tensors as float16
    eval_data: str | None = None  # COCO JSON to measure mask/box AP on
    eval_every: int = 0  # steps; 0: at the end of each epoch (when eval_data)
    eval_images: int = 50
    threads: int | None = None  # torch.set_num_threads for this process
    storage_path: str | None = None  # Ray Train run storage (shared by all nodes)
    extra: dict = field(default_factory=dict)  # kwargs for the MaskRCNN constructor
    # fsspec options for every read and write (data, images, --init, out), as `segbatch run --storage-options`
    # takes them; they may hold credentials, so they never appear in the repr
    storage_options: dict = field(default_factory=dict, repr=False)
