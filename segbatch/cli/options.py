"""Every option, defined once for every command (as rasterio's ``rio/options.py``).

A job option is bound to the config field it sets: its default is that field's
default and its choices are the config's own tuple, so the command line, a
``--config`` file and the dataclasses cannot drift apart. ``build_config``
turns parsed options (and a ``--config`` file beneath them) into a validated
``JobConfig``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import click

from segbatch.config import DECODERS, DEVICES, PRECISIONS, PROGRESS_MODES, JobConfig, ModelConfig


class ConfigOption(click.Option):
    """An option that sets one field of a config dataclass (``config_field``: class, name)."""

    def __init__(self, *args: Any, config_field: tuple[type, str], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.config_field = config_field


class JsonObject(click.ParamType):
    """A JSON object on the command line (a mapping from a --config file passes as it is)."""

    name = "json"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> dict[str, Any]:
        if isinstance(value, dict):
            return value
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            self.fail(f"not JSON: {exc}", param, ctx)
        if not isinstance(parsed, dict):
            self.fail(f"must be a JSON object, like '{{\"anon\": true}}', not {value!r}", param, ctx)
        return parsed


def field_default(cls: type, name: str) -> Any:
    """A config dataclass field's default (its factory's value for mutable ones)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def config_option(cls: type, field: str, *decls: str, **kwargs: Any):
    """A click option that sets ``cls.field``, with the field's default.

    ``decls`` are the flag (and, where the option's name differs from the
    field's, its name: ``--stall-timeout`` sets ``stall_timeout_s``)."""
    kwargs.update(cls=ConfigOption, config_field=(cls, field))
    default = field_default(cls, field)
    if default is dataclasses.MISSING or kwargs.get("is_flag"):  # a required field, or a flag: off unless given
        return click.option(*decls, **kwargs)
    kwargs.setdefault("show_default", default is not None and default != {})
    kwargs.setdefault("default", default)
    return click.option(*decls, **kwargs)


storage_options = click.option(
    "--storage-options",
    type=JsonObject(),
    default=None,
    help='JSON for fsspec, passed through to the filesystem, e.g. \'{"endpoint_url": "http://..."}\'.',
)
progress = config_option(JobConfig, "progress", "--progress", type=click.Choice(PROGRESS_MODES))
workers = config_option(
    JobConfig,
    "workers",
    "--workers",
    type=int,
    show_default=False,
    help="Actors in the pool (0: as many as the cluster's GPUs or CPUs allow).",
)
model = config_option(
    ModelConfig, "model", "--model", help="coco, coco-v2, keypoint-coco, demo, random, or a checkpoint path/URI."
)

# `segbatch run` (and `submit`): one option per config field, in the contract's names
_M, _J = ModelConfig, JobConfig
JOB_OPTIONS = [
    click.option(
        "--config",
        "config_file",
        type=click.Path(exists=True, dir_okay=False),
        help="A job config (YAML); options given here override it.",
    ),
    model,
    config_option(
        _M, "classes", "--classes", help="Class names for a checkpoint: a text file, one a line, line 0 the background."
    ),
    config_option(
        _M,
        "keypoints",
        "--keypoints",
        help="Keypoint names for a Keypoint R-CNN checkpoint: a text file, one a line, in the model's order.",
    ),
    config_option(_J, "shard_size", "--shard-size", type=int, help="Images per shard (one Parquet file each)."),
    workers,
    config_option(_J, "gpus_per_worker", "--gpus-per-worker", type=float),
    config_option(
        _J,
        "cpus_per_worker",
        "--cpus-per-worker",
        type=float,
        show_default=False,
        help="0: beside a GPU its share of the node's CPUs (1 to 8), else up to 4.",
    ),
    config_option(_J, "batch_size", "--batch-size", type=int),
    config_option(
        _J,
        "encode_processes",
        "--encode-processes",
        type=int,
        help="Processes turning masks into RLE "
        "[default: the worker's CPUs less 2 (at least 2) beside a GPU, 0 (a thread) on CPUs].",
    ),
    config_option(
        _J,
        "decode",
        "--decode",
        type=click.Choice(DECODERS),
        help="Where JPEGs are decoded: auto is the GPU (nvjpeg) when the worker has one.",
    ),
    config_option(_M, "score_threshold", "--score-threshold", type=float),
    config_option(_M, "mask_threshold", "--mask-threshold", type=float),
    config_option(_M, "max_detections", "--max-detections", type=int),
    config_option(
        _M,
        "min_size",
        "--min-size",
        type=int,
        help="Shorter side the model sees [default: the model's own, 800 for COCO].",
    ),
    config_option(
        _M, "max_size", "--max-size", type=int, help="Longer side limit [default: the model's own, 1333 for COCO]."
    ),
    config_option(_M, "precision", "--precision", type=click.Choice(PRECISIONS)),
    config_option(
        _M,
        "force_precision",
        "--force-precision",
        is_flag=True,
        help="Run --precision bf16 even on a CPU without native bf16 (3x to 20x slower than fp32 there).",
    ),
    config_option(_M, "device", "--device", type=click.Choice(DEVICES)),
    config_option(_J, "retries", "--retries", type=int, help="Attempts per shard after the first."),
    config_option(_J, "address", "--address", help="A Ray cluster to join (default: start Ray locally)."),
    config_option(
        _J,
        "autoscaling_config",
        "--autoscaling-config",
        help="The autoscaler's cluster config (ray up's YAML, or a KubeRay RayCluster/RayJob manifest): "
        "the pool is sized for the nodes it can add [default: the GCS's, or ~/ray_bootstrap_config.yaml on the head].",
    ),
    storage_options,
    config_option(_J, "max_pixels", "--max-pixels", type=int, help="Larger images are refused (decompression bombs)."),
    config_option(
        _J,
        "stall_timeout_s",
        "--stall-timeout",
        "stall_timeout",
        type=float,
        help="Seconds a worker may go without progress.",
    ),
    config_option(
        _J,
        "startup_timeout_s",
        "--startup-timeout",
        "startup_timeout",
        type=float,
        help="Seconds to wait for the first worker.",
    ),
    config_option(_J, "overwrite", "--overwrite", is_flag=True, help="Start over: remove DEST's results first."),
    progress,
    config_option(_M, "seed", "--seed", type=int, hidden=True, help="Seed of --model random."),
    config_option(
        _J,
        "tile_size",
        "--tile-size",
        type=int,
        help="Cut rasters (GeoTIFF, COG) into tiles of this many pixels; 0: images whole.",
    ),
    config_option(
        _J,
        "tile_overlap",
        "--tile-overlap",
        type=int,
        help="Pixels neighbouring tiles share (objects cut by a seam are merged).",
    ),
    config_option(
        _J,
        "bands",
        "--bands",
        help="Raster bands (1-based) for the model's R,G,B, e.g. 4,3,2; or one band [default: 1,2,3].",
    ),
    config_option(
        _J,
        "scale",
        "--scale",
        help="LOW,HIGH samples mapped to 0..255 for 16-bit or float rasters [default: each band's min..max].",
    ),
    config_option(
        _J,
        "aoi",
        "--aoi",
        help="Area of interest: minlon,minlat,maxlon,maxlat, or a GeoJSON/GeoPackage file or URL (any CRS); "
        "tiles outside it are skipped, objects outside it not reported.",
    ),
    config_option(
        _J,
        "semantic_out",
        "--semantic-out",
        help="A folder for per-input class maps (COG for rasters, PNG for images).",
    ),
    config_option(
        _J,
        "objects_crs",
        "--objects-crs",
        help="Write every raster's objects (DEST/objects) in this CRS, e.g. EPSG:4326, so scenes in "
        "different UTM zones read as one layer [default: each raster's own].",
    ),
    config_option(
        _J,
        "simplify",
        "--simplify",
        help="Simplify object polygons within this tolerance, topology preserved: in the raster's CRS "
        "units (0.5: half a metre in UTM) or pixels (2px). Masks stay exact.",
    ),
    config_option(
        _J,
        "min_area",
        "--min-area",
        help="Leave objects smaller than this out of DEST/objects (their rows keep them): in the raster's "
        "CRS units squared (25: 25 m2 in UTM) or pixels (100px).",
    ),
    config_option(
        _J,
        "count_by",
        "--count-by",
        help="A regex with named groups over URIs, e.g. 'store-(?P<store>[^/]+)/': "
        "writes DEST/counts.parquet per group and class.",
    ),
    config_option(
        _J,
        "stac_asset",
        "--stac-asset",
        help="For a STAC SOURCE (Item, ItemCollection, Collection or Catalog JSON): the asset of each item to segment.",
    ),
]


def job_options(f):
    """The options of `segbatch run` (and what `segbatch submit` checks)."""
    for option in reversed(JOB_OPTIONS):
        f = option(f)
    return f


def build_config(ctx: click.Context, source: str | None, dest: str | None, params: dict[str, Any]) -> JobConfig:
    """Options (and a --config file beneath them) to a validated JobConfig."""
    values = dict(params)
    config_file = values.pop("config_file", None)
    if config_file:
        file_values = read_config_file(config_file, ctx.command)
        for key, value in file_values.items():
            if key in ("source", "dest", "config_file"):
                continue
            if ctx.get_parameter_source(key) in (None, click.core.ParameterSource.DEFAULT):
                values[key] = _file_value(ctx, key, value, config_file)
        source = source or file_values.get("source")
        dest = dest or file_values.get("dest")
    if not source or not dest:
        raise click.UsageError("SOURCE and DEST are required (on the command line or in --config)")
    for name, kind in (("bands", int), ("scale", float)):
        values[name] = _number_list(values.get(name), kind, name)
    fields: dict[type, dict[str, Any]] = {ModelConfig: {}, JobConfig: {"storage_options": {}}}
    bound = {p.name: p.config_field for p in ctx.command.params if isinstance(p, ConfigOption)}
    bound["storage_options"] = (JobConfig, "storage_options")  # shared with the commands that only read
    for name, value in values.items():
        cls, field = bound[name]
        fields[cls][field] = value if value is not None or field != "storage_options" else {}
    return JobConfig(source=source, dest=dest, model=ModelConfig(**fields[ModelConfig]), **fields[JobConfig])


def _file_value(ctx: click.Context, key: str, value: Any, path: str) -> Any:
    """A --config value converted by its option's click type, as the command
    line's would be (YAML reads ``shard_size: "64"`` as a string). Lists and
    mappings (``bands: [4, 3, 2]``, ``storage_options: {...}``) are left to
    build_config, which takes them as they are."""
    param = next(p for p in ctx.command.params if p.name == key)
    if value is None or isinstance(value, (list, dict)):
        return value
    try:
        return param.type_cast_value(ctx, value)
    except click.BadParameter as exc:
        raise click.BadParameter(f"{path}: {key}: {exc.message}", param_hint="--config") from None


def _number_list(value: Any, kind: type, name: str) -> tuple | None:
    """``4,3,2`` (or a YAML list) to a tuple of numbers."""
    if value is None or isinstance(value, tuple):
        return value
    items = value if isinstance(value, list) else str(value).split(",")
    try:
        return tuple(kind(v) for v in items)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a comma-separated list of numbers", param_hint=f"--{name}"
        ) from None


def read_config_file(path: str, command: click.Command) -> dict[str, Any]:
    """A YAML job config as option names to values; unknown keys are refused
    with the nearest known name, as a typo would otherwise be silently ignored."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="--config") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path} must hold a mapping of option names to values", param_hint="--config")
    known = {p.name for p in command.params if p.name} | {"source", "dest"}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known - {"config_file"})
    if unknown:
        import difflib

        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, known, 1)) else k for k in unknown]
        raise click.BadParameter(f"{path}: unknown keys: {', '.join(hints)}", param_hint="--config")
    return data
