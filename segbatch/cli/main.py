"""segbatch's commands: options in, a typed config out, the job run, progress shown.

The only module that prints. Errors a user can cause (``errors.SegbatchError``
and its kinds) are caught in one place, ``SegbatchGroup.invoke``, and shown as
one line ``segbatch: error: <message>`` with the error's exit status; anything
else is a bug and keeps its traceback. Everything this process logs or prints
as an error goes through ``redact``, so no credential reaches the terminal.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

import click

from segbatch import __version__
from segbatch.config import JobConfig, ModelConfig
from segbatch.errors import SegbatchError, StorageFault
from segbatch.redact import redact

log = logging.getLogger("segbatch")

MODEL_OPTIONS = {
    "model", "classes", "score_threshold", "mask_threshold", "max_detections",
    "min_size", "max_size", "precision", "device", "seed",
}  # fmt: skip


def _job_options(f):
    """The options of `run` (and `submit`), in the contract's names."""
    options = [
        click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), help="A job config (YAML); options given here override it."),
        click.option("--model", default="demo", show_default=True, help="coco, coco-v2, demo, random, or a checkpoint path/URI."),
        click.option("--classes", default=None, help="Class names for a checkpoint: a text file, one a line, line 0 the background."),
        click.option("--shard-size", type=int, default=64, show_default=True, help="Images per shard (one Parquet file each)."),
        click.option("--workers", type=int, default=0, help="Actors in the pool (0: as many as the cluster's GPUs or CPUs allow)."),
        click.option("--gpus-per-worker", type=float, default=1.0, show_default=True),
        click.option("--cpus-per-worker", type=float, default=0.0, help="0: beside a GPU its share of the node's CPUs (1 to 8), else up to 4."),
        click.option("--batch-size", type=int, default=2, show_default=True),
        click.option("--encode-processes", type=int, default=None, help="Processes turning masks into RLE [default: the worker's CPUs less 2 (at least 2) beside a GPU, 0 (a thread) on CPUs]."),
        click.option("--decode", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True, help="Where JPEGs are decoded: auto is the GPU (nvjpeg) when the worker has one."),
        click.option("--score-threshold", type=float, default=0.5, show_default=True),
        click.option("--mask-threshold", type=float, default=0.5, show_default=True),
        click.option("--max-detections", type=int, default=100, show_default=True),
        click.option("--min-size", type=int, default=None, help="Shorter side the model sees [default: the model's own, 800 for COCO]."),
        click.option("--max-size", type=int, default=None, help="Longer side limit [default: the model's own, 1333 for COCO]."),
        click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        click.option("--retries", type=int, default=3, show_default=True, help="Attempts per shard after the first."),
        click.option("--address", default=None, help="A Ray cluster to join (default: start Ray locally)."),
        click.option("--storage-options", default=None, help='JSON for fsspec, e.g. \'{"endpoint_url": "http://..."}\'.'),
        click.option("--max-pixels", type=int, default=178_956_970, show_default=True, help="Larger images are refused (decompression bombs)."),
        click.option("--stall-timeout", type=float, default=600.0, show_default=True, help="Seconds a worker may go without progress."),
        click.option("--startup-timeout", type=float, default=300.0, show_default=True, help="Seconds to wait for the first worker."),
        click.option("--overwrite", is_flag=True, help="Start over: remove DEST's results first."),
        click.option("--progress", type=click.Choice(["auto", "bar", "lines", "none"]), default="auto", show_default=True),
        click.option("--seed", type=int, default=0, hidden=True, help="Seed of --model random."),
        click.option("--tile-size", type=int, default=0, show_default=True, help="Cut rasters (GeoTIFF, COG) into tiles of this many pixels; 0: images whole."),
        click.option("--tile-overlap", type=int, default=64, show_default=True, help="Pixels neighbouring tiles share (objects cut by a seam are merged)."),
        click.option("--bands", default=None, help="Raster bands (1-based) for the model's R,G,B, e.g. 4,3,2; or one band [default: 1,2,3]."),
        click.option("--scale", default=None, help="LOW,HIGH samples mapped to 0..255 for 16-bit or float rasters [default: each band's min..max]."),
        click.option("--semantic-out", default=None, help="A folder for per-input class maps (COG for rasters, PNG for images)."),
        click.option("--count-by", default=None, help="A regex with named groups over URIs, e.g. 'store-(?P<store>[^/]+)/': writes DEST/counts.parquet per group and class."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def build_config(ctx: click.Context, source: str | None, dest: str | None, params: dict[str, Any]) -> JobConfig:
    """Options (and a --config file beneath them) to a validated JobConfig."""
    values = dict(params)
    config_file = values.pop("config_file", None)
    if config_file:
        file_values = _read_config_file(config_file)
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
    storage_options = values.pop("storage_options")
    if isinstance(storage_options, str):
        try:
            storage_options = json.loads(storage_options)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--storage-options") from None
    model = ModelConfig(**{k: values.pop(k) for k in MODEL_OPTIONS})
    renames = {"stall_timeout": "stall_timeout_s", "startup_timeout": "startup_timeout_s"}
    job = {renames.get(k, k): v for k, v in values.items()}
    return JobConfig(source=source, dest=dest, model=model, storage_options=storage_options or {}, **job)


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
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers", param_hint=f"--{name}") from None


def _read_config_file(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="--config") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path} must hold a mapping of option names to values", param_hint="--config")
    known = {p.name for p in run.params if p.name} | {"source", "dest"}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known - {"config_file"})
    if unknown:
        import difflib

        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, known, 1)) else k for k in unknown]
        raise click.BadParameter(f"{path}: unknown keys: {', '.join(hints)}", param_hint="--config")
    return data


class SegbatchGroup(click.Group):
    """The command group: the one place where a user's error becomes one line
    and an exit status instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SegbatchError as exc:
            click.echo(f"segbatch: error: {error_line(exc)}", err=True)
            ctx.exit(exc.exit_code)


def error_line(exc: BaseException) -> str:
    """An error's message on one line, credentials masked (a URL given as SOURCE
    or DEST may carry a password or a presigned query)."""
    return re.sub(r"\s*\n\s*", " ", redact(str(exc)).strip()) or type(exc).__name__


class RedactingFilter(logging.Filter):
    """Masks credentials in every log record of this process (a URL with a
    password or a presigned query may be logged as given)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


@click.group(cls=SegbatchGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="segbatch")
@click.option("-v", "--verbose", count=True, help="More log lines (-vv for debug).")
def main(verbose: int) -> None:
    """Batch instance segmentation (Mask R-CNN) of image archives on Ray."""
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    logging.getLogger("segbatch").setLevel(min(level, logging.INFO))
    for noisy in ("botocore", "aiobotocore", "s3fs", "urllib3"):  # at DEBUG they log request headers
        logging.getLogger(noisy).setLevel(logging.WARNING)


@main.command()
@click.argument("source", required=False)
@click.argument("dest", required=False)
@_job_options
@click.pass_context
def run(ctx: click.Context, source: str | None, dest: str | None, **params) -> None:
    """Segment every image under SOURCE into Parquet files under DEST.

    SOURCE: a folder, a glob, an fsspec URL prefix (s3://bucket/prefix/) or a
    manifest (.txt, or .csv/.parquet with a uri column). DEST: a path or URL.
    """
    cfg = build_config(ctx, source, dest, params)
    sys.exit(run_and_report(cfg))


def run_and_report(cfg: JobConfig) -> int:
    """Run the job with a progress display; returns the exit status.

    A store that fails the job before it starts (a missing bucket, an
    endpoint that does not answer, access denied) is the user's setup to fix:
    exit status 2, as for a usage error. Once the job has started, a storage
    fault is the job's failure (1), and the same command resumes.
    """
    from segbatch.engine import run_job

    display = ProgressDisplay(cfg.progress)
    try:
        result = run_job(cfg, on_progress=display.update)
    except StorageFault as exc:
        if not display.updates:
            exc.exit_code = 2
        raise
    finally:
        display.close()
    s = result.summary
    click.echo(
        f"{s['rows']} rows ({s['errors']} with errors, {s['detections']} detections) in {redact(cfg.dest)}; "
        f"{s['images_this_run']} images this run in {s['wall_s']:.1f} s ({s['images_per_s_this_run']:.2f} images/s)",
        err=True,
    )
    if not result.complete:
        what = [f"{len(result.failed)} shards stayed uncommitted"] if result.failed else []
        what += [f"{len(result.failed_scenes)} scenes were not merged"] if result.failed_scenes else []
        click.echo(
            f"segbatch: incomplete: {' and '.join(what)} after their retries; "
            "run the same command again to resume them. Causes:",
            err=True,
        )
        for shard, error in sorted(result.failed.items()):
            click.echo(f"  shard {shard}: {redact(str(error))}", err=True)
        for scene, error in sorted(result.failed_scenes.items()):
            click.echo(redact(f"  scene {scene}: {error}"), err=True)
        return 1
    return 0


class ProgressDisplay:
    """A tqdm bar on a terminal, a plain line every few seconds otherwise."""

    LINE_EVERY_S = 10.0

    def __init__(self, mode: str):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode
        self.bar = None
        self.last_line = 0.0
        self.last_text = ""
        self.updates = 0  # none yet: the job has not started

    def update(self, p) -> None:
        self.updates += 1
        if self.mode == "none":
            return
        if self.mode == "bar":
            from tqdm import tqdm

            if self.bar is None:
                self.bar = tqdm(total=p.total, initial=p.done, unit="img", dynamic_ncols=True, file=sys.stderr)
            self.bar.update(p.done - self.bar.n)
            self.bar.set_postfix(failed=p.errors, shards=f"{p.shards_done}/{p.shards_total}", workers=p.workers, refresh=False)
            return
        now = time.monotonic()
        text = _progress_line(p)
        if (now - self.last_line >= self.LINE_EVERY_S or p.done == p.total) and text != self.last_text:
            self.last_line, self.last_text = now, text
            click.echo(redact(text), err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _progress_line(p) -> str:
    eta = "-" if p.eta_s is None else _duration(p.eta_s)
    pct = 100.0 * p.done / p.total if p.total else 100.0
    return (
        f"progress: {p.done}/{p.total} images ({pct:.1f}%), {p.rate:.2f} images/s, ETA {eta}, "
        f"{p.errors} failed images, shards {p.shards_done}/{p.shards_total}"
        + (f", {p.shards_failed} failed shards" if p.shards_failed else "")
        + (f" [{p.message}]" if p.message else "")
    )


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _storage(storage_options: str | None):
    from segbatch.storage import Storage

    try:
        return Storage(json.loads(storage_options) if storage_options else {})
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--storage-options") from None


storage_option = click.option("--storage-options", default=None, help="JSON for fsspec.")


@main.command()
@click.argument("dest", required=False)
@storage_option
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON.")
@click.option("--job", "job_id", default=None, help="A submission id from `segbatch submit --no-wait`.")
@click.option("--address", default=None, help="The cluster's Jobs API, with --job.")
@click.option("--follow", is_flag=True, help="With --job: stream the logs until the job ends.")
def status(dest, storage_options, as_json, job_id, address, follow) -> None:
    """Progress and summary of the job writing DEST (running or finished),
    or, with --job, of a job submitted to a cluster."""
    from segbatch.engine import JobStore

    if job_id:
        _job_status(job_id, address, follow)
        return
    if not dest:
        raise click.UsageError("give DEST, or --job ID")

    store = JobStore(dest, _storage(storage_options))
    plan = store.read_plan()  # read-only: a clear under way (another run's --overwrite) is left to its driver
    if plan is None and store.clearing():
        raise click.ClickException(
            f"{dest} is being cleared by a run with --overwrite (or one that was cut short: the next "
            "`segbatch run` on it finishes the clear); ask again once that run has started"
        )
    if plan is None:
        raise click.ClickException(f"{redact(dest)} holds no segbatch job (no _segbatch/plan.parquet)")
    shards, _ = plan
    scenes = store.read_scenes()  # a tiled job: its shards hold tiles, its rows are scenes
    if scenes:
        store = JobStore(dest, store.storage, tiled=True)
    records = store.commit_records()
    progress = store.read_progress() or {}
    summary = store.read_summary()
    total = sum(len(s.uris) for s in shards)
    done = sum(r.get("rows", 0) for r in records)
    state = {
        "dest": dest,
        "images": total,
        "images_committed": done,
        "shards": len(shards),
        "shards_committed": len(records),
        "errors": sum(r.get("errors", 0) for r in records),
        "detections": sum(r.get("detections", 0) for r in records),
        "running": summary is None or (progress.get("updated", 0) > summary.get("finished", 0)),
        "progress": progress,
        "summary": summary,
    }
    unit = "tiles" if scenes else "images"
    if scenes:
        merged = store.scene_records()
        state.update(scenes=len(scenes), scenes_merged=len(merged), detections=sum(r.get("detections", 0) for r in merged))
    if as_json:
        click.echo(json.dumps(state, indent=2))
        return
    pct = 100.0 * done / total if total else 100.0
    click.echo(f"{dest}: {done}/{total} {unit} committed ({pct:.1f}%), shards {len(records)}/{len(shards)}")
    if scenes:
        click.echo(f"  scenes merged: {state['scenes_merged']}/{state['scenes']}")
    click.echo(f"  {state['errors']} {unit} with errors, {state['detections']} detections")
    if progress:
        age = time.time() - progress.get("updated", 0)
        eta = progress.get("eta_s")
        click.echo(
            f"  last progress {age:.0f} s ago: {progress.get('images_per_s', 0):.2f} images/s, "
            f"ETA {'-' if eta is None else _duration(eta)}, {progress.get('workers', 0)} workers"
            + (f" [{progress['message']}]" if progress.get("message") else "")
        )
    if summary:
        state_text = "complete" if summary.get("complete") else "incomplete"
        click.echo(f"  last run: {state_text}, {summary.get('wall_s', 0):.1f} s, {summary.get('images_per_s_this_run', 0):.2f} images/s")
        for shard, error in (summary.get("failed_shards") or {}).items():
            click.echo(f"  failed shard {shard}: {error}")
        for scene, error in (summary.get("failed_scenes") or {}).items():
            click.echo(f"  scene not merged {scene}: {error}")


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--address", default=None, help="The cluster's Jobs API, e.g. http://HEAD:8265 [default: RAY_ADDRESS or local].")
@click.option("--no-wait", is_flag=True, help="Print the submission id and return; follow with `segbatch status --job ID`.")
@click.option("--submission-id", default=None, help="Name the job (Ray refuses a name used before).")
@click.option("--pip", "pip_packages", multiple=True, help="Extra pip packages for the job's runtime environment.")
@click.argument("run_args", nargs=-1, type=click.UNPROCESSED)
def submit(address, no_wait, submission_id, pip_packages, run_args) -> None:
    """Run `segbatch run RUN_ARGS` on a Ray cluster through Ray's Jobs API.

    RUN_ARGS are those of `segbatch run` (SOURCE DEST [options]); they are
    checked here before anything is sent. Streams the job's logs and exits
    with its status.
    """
    from segbatch.engine import submit as jobs

    ctx = run.make_context("run", list(run_args))  # the same options, the same errors, before submitting
    build_config(ctx, ctx.params.pop("source"), ctx.params.pop("dest"), dict(ctx.params))
    jobs.refuse_secrets(list(run_args), list(pip_packages), submission_id)  # before any connection
    with _jobs_api(address):
        client, job_id = jobs.submit(address, list(run_args), submission_id=submission_id, env=jobs.runtime_env(list(pip_packages)))
    click.echo(f"submitted {job_id} to {jobs.dashboard_address(address)}", err=True)
    if no_wait:
        click.echo(job_id)
        return
    with _jobs_api(address):
        final = jobs.follow(client, job_id, lambda line: click.echo(redact(line)))
    click.echo(f"job {job_id}: {final.value}", err=True)
    sys.exit(0 if final.value == "SUCCEEDED" else 1)


@main.command()
@click.argument("dest")
@click.option("--count", type=int, default=24, show_default=True, help="Scenes to generate.")
@click.option("--seed", type=int, default=2026, show_default=True, help="Scene seed (the demo model never saw 2026).")
@click.option("--model", default="demo", show_default=True)
@click.option("--workers", type=int, default=0)
@click.option("--progress", type=click.Choice(["auto", "bar", "lines", "none"]), default="auto", show_default=True)
def demo(dest: str, count: int, seed: int, model: str, workers: int, progress: str) -> None:
    """Generate scenes with ground truth, segment them, print the mask AP, render overlays.

    Writes DEST/_demo/images/, DEST/_demo/ground_truth.json (COCO), the
    results in DEST/data/, overlay pictures in DEST/_render/ and the page
    DEST/report.html. Works offline.
    """
    from segbatch.outputs import evaluate
    from segbatch.outputs import write_report
    from segbatch.outputs import read_rows
    from segbatch.storage import Storage, is_local, join
    from segbatch.train import write_dataset

    if not is_local(dest):
        raise click.UsageError("segbatch demo writes its scenes to a local folder; give a local DEST")
    demo_dir = join(dest, "_demo")
    click.echo(f"generating {count} scenes (seed {seed}) in {demo_dir}", err=True)
    gt_path = write_dataset(demo_dir, count, seed)
    cfg = JobConfig(
        source=join(demo_dir, "images"),
        dest=dest,
        model=ModelConfig(model=model),
        shard_size=max(1, min(16, count // 2)),
        workers=workers,
        progress=progress,
    )
    status_code = run_and_report(cfg)
    if status_code:
        sys.exit(status_code)
    storage = Storage()
    figures = evaluate(read_rows(dest, storage), json.loads(Path(gt_path).read_text()))
    click.echo(_ap_text(figures))
    written = render_to(dest, join(dest, "_render"), 6, (), 0.5, 0, storage)  # the demo's own DEST
    click.echo(f"overlays: {len(written)} pictures in {join(dest, '_render')}", err=True)
    page, _ = write_report(dest, join(dest, "report.html"), storage)
    click.echo(f"report: {page} (open it in a browser)", err=True)
    click.echo(f"results: {join(dest, 'data')} (read with pandas.read_parquet or DuckDB)", err=True)


@main.command()
@click.argument("data")
@click.option("--out", required=True, help="Checkpoint to write (path or URL).")
@click.option("--arch", type=click.Choice(["demo", "resnet50_fpn", "resnet50_fpn_v2"]), default=None, help="[default: the --init checkpoint's, else demo]")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--lr", type=float, default=6e-4, show_default=True)
@click.option("--min-size", type=int, default=256, show_default=True)
@click.option("--max-size", type=int, default=320, show_default=True)
@click.option("--init", default=None, help="A checkpoint to start from (fine-tuning): any that `segbatch run --model` takes, e.g. torchvision's COCO state_dict.")
@click.option("--eval-data", default=None, help="COCO ground truth to measure mask AP on after each epoch (not with --workers).")
@click.option("--workers", type=int, default=0, help="Ray Train workers (0: train in this process).")
@click.option("--gpu", "use_gpu", is_flag=True, help="Ray Train workers on GPUs.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--half", is_flag=True, help="Store the weights as float16 (half the file).")
@click.option("--loader-workers", type=int, default=0, show_default=True, help="DataLoader processes reading and decoding the images.")
@click.option("--time-budget", type=float, default=None, help="Seconds: fewer steps (and a schedule that fits) when the epochs would take longer.")
def train(data, out, arch, epochs, batch_size, lr, min_size, max_size, init, eval_data, workers, use_gpu, seed, half, loader_workers, time_budget) -> None:
    """Fine-tune or train Mask R-CNN on a COCO dataset (DATA: its JSON).

    Writes a checkpoint that `segbatch run --model` takes as it is. With
    --workers N, training runs on N Ray Train workers (TorchTrainer).
    """
    from segbatch.train import TrainConfig, train as train_local, train_distributed

    cfg = TrainConfig(
        data=data, out=out, arch=arch, epochs=epochs, batch_size=batch_size, lr=lr, min_size=min_size,
        max_size=max_size, init=init, eval_data=eval_data, workers=max(workers, 1), use_gpu=use_gpu, seed=seed, half=half,
        loader_workers=loader_workers, time_budget_s=time_budget,
    )  # fmt: skip
    path = train_distributed(cfg) if workers else _train_with_bar(cfg, train_local)
    click.echo(f"checkpoint written to {path}; use it with: segbatch run SOURCE DEST --model {path}", err=True)


def _train_with_bar(cfg, train_local) -> str:
    """Train in this process with a progress bar and a line per evaluation."""
    from tqdm import tqdm

    bar = None

    def on_progress(event: dict) -> None:
        nonlocal bar
        if event.get("event") == "eval":
            tqdm.write(f"epoch {event['epoch']}: mask AP {event['mask_ap']:.3f}, box AP {event['box_ap']:.3f}", file=sys.stderr)
            return
        if bar is None:
            bar = tqdm(total=event["steps"], unit="step", file=sys.stderr, dynamic_ncols=True)
        bar.update(event["step"] - bar.n)
        bar.set_postfix(loss=f"{event['loss']:.3f}", epoch=event["epoch"], refresh=False)

    try:
        return train_local(cfg, on_progress)
    finally:
        if bar is not None:
            bar.close()


@main.command()
@click.argument("dest")
@click.option("--coco", "coco_out", required=True, help="Where to write the COCO results JSON (path or URL).")
@click.option("--ground-truth", default=None, help="COCO ground truth: take image ids from it, matched by file name.")
@storage_option
def export(dest: str, coco_out: str, ground_truth: str | None, storage_options: str | None) -> None:
    """COCO results JSON (pycocotools' loadRes format) of DEST's detections."""
    from segbatch.outputs import coco_results, match_images
    from segbatch.outputs import read_rows

    storage = _storage(storage_options)
    rows = read_rows(dest, storage)
    ids, categories = None, None  # without ground truth: ids 1.. and the model's labels
    if ground_truth:
        gt = json.loads(storage.read_bytes(ground_truth))
        ids = match_images(rows, gt["images"])
        categories = gt.get("categories")
    results = coco_results(rows, ids, categories)
    storage.write_bytes(coco_out, json.dumps(results).encode())
    click.echo(f"{len(results)} detections of {len(rows)} images written to {coco_out}", err=True)


@main.command(name="eval")
@click.argument("dest")
@click.argument("ground_truth")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@storage_option
def eval_(dest: str, ground_truth: str, as_json: bool, storage_options: str | None) -> None:
    """Box and mask AP of DEST against COCO GROUND_TRUTH.json (pycocotools' COCOeval)."""
    from segbatch.outputs import evaluate
    from segbatch.outputs import read_rows

    storage = _storage(storage_options)
    rows, gt = read_rows(dest, storage), json.loads(storage.read_bytes(ground_truth))
    figures = evaluate(rows, gt)
    if as_json:
        click.echo(json.dumps(figures, indent=2))
        return
    click.echo(_ap_text(figures))


def _ap_text(figures: dict[str, Any]) -> str:
    lines = [f"images matched: {figures['images_matched']} of {figures['images_ground_truth']} in the ground truth"]
    for kind, title in (("bbox", "box "), ("segm", "mask")):
        f = figures[kind]
        lines.append(
            f"{title} AP {f['AP']:.3f}  AP50 {f['AP50']:.3f}  AP75 {f['AP75']:.3f}  "
            f"APs {f['APs']:.3f}  APm {f['APm']:.3f}  APl {f['APl']:.3f}  AR100 {f['AR100']:.3f}"
        )
    return "\n".join(lines)


@main.command()
@click.argument("dest")
@click.option("--out", "out_dir", default=None, help="Folder for the PNGs [default: ./NAME-render/, NAME: DEST's last part].")
@click.option("--count", type=int, default=8, show_default=True, help="How many images, when --uri is not given.")
@click.option("--uri", "uris", multiple=True, help="An image to render (repeatable); matches a full URI or its file name.")
@click.option("--min-score", type=float, default=0.0, show_default=True)
@click.option("--seed", type=int, default=0, help="Which sample of images.")
@storage_option
def render(dest, out_dir, count, uris, min_score, seed, storage_options) -> None:
    """PNG overlays of masks, boxes, labels and scores on their images."""
    out_dir = out_dir or beside_here(dest, "-render")  # never into DEST: render only reads it
    written = render_to(dest, out_dir, count, uris, min_score, seed, _storage(storage_options))
    click.echo(f"{len(written)} overlays written to {out_dir}", err=True)


def beside_here(dest: str, suffix: str) -> str:
    """A default output of a read-only command, in the current folder and named
    after DEST's last part (``out/demo`` -> ``demo-report.html``): read-only
    commands never write into DEST, which may be another job's, or be running."""
    name = dest.rstrip("/").rsplit("/", 1)[-1].split("://")[-1] or "segbatch"
    return str(Path.cwd() / f"{name}{suffix}")


def render_to(dest, out_dir, count, uris, min_score, seed, storage) -> list[str]:
    """Render overlays of some of DEST's images into ``out_dir``; returns the PNG URLs."""
    import io

    from segbatch.outputs import render_rows
    from segbatch.storage import join, output_name

    written = []
    for uri, picture in render_rows(dest, storage, count, tuple(uris), seed, min_score):
        buf = io.BytesIO()
        picture.save(buf, format="PNG")
        url = join(out_dir, output_name(uri, ".png"))  # unique where archives repeat file names
        storage.write_bytes(url, buf.getvalue())
        written.append(url)
    if uris and not written:
        raise click.ClickException(f"none of {', '.join(uris)} is in {dest} (or none could be read)")
    return written


@main.command()
@click.argument("dest")
@click.option("--by", "pattern", required=True, help="A regex with named groups over URIs, e.g. 'store-(?P<store>[^/]+)/'.")
@click.option("--out", default=None, help="Parquet file to write [default: DEST/counts.parquet]; '-' prints a table.")
@click.option("--min-score", type=float, default=0.0, show_default=True)
@storage_option
def counts(dest, pattern, out, min_score, storage_options) -> None:
    """Detections per group of images (from their URIs) and class."""
    from segbatch.outputs import CountsError, count_table
    from segbatch.storage import join

    storage = _storage(storage_options)
    try:
        table = count_table(dest, storage, pattern, min_score)
    except CountsError as exc:
        raise click.BadParameter(str(exc), param_hint="--by") from None
    if out == "-":
        click.echo(table.to_pandas().to_string(index=False))
        return
    out = out or join(dest, "counts.parquet")
    storage.write_parquet(table, out)
    click.echo(f"{table.num_rows} rows (group, class) written to {out}", err=True)


@main.command()
@click.argument("dest")
@click.option("--out", default=None, help="Where to write the page (path or URL) [default: ./NAME-report.html].")
@click.option("--overlays", type=int, default=4, show_default=True, help="Overlay pictures on the page.")
@click.option("--seed", type=int, default=0, help="Which sample of images gets overlays.")
@storage_option
def report(dest, out, overlays, seed, storage_options) -> None:
    """A single HTML page of DEST's results: counts per class, scores, pace, errors, overlays."""
    from segbatch.outputs import write_report

    out = out or beside_here(dest, "-report.html")  # never into DEST: report only reads it
    _, s = write_report(dest, out, _storage(storage_options), overlays=overlays, seed=seed)
    click.echo(f"{s.images:,} images, {s.detections:,} detections, {s.errors:,} errors: report written to {out}", err=True)


def _job_status(job_id: str, address: str | None, follow: bool) -> None:
    from segbatch.engine import submit as jobs

    if follow:
        from ray.job_submission import JobSubmissionClient

        with _jobs_api(address):
            client = JobSubmissionClient(jobs.dashboard_address(address))
            final = jobs.follow(client, job_id, lambda line: click.echo(redact(line)))
        click.echo(f"job {job_id}: {final.value}", err=True)
        sys.exit(0 if final.value == "SUCCEEDED" else 1)
    with _jobs_api(address):
        state, message, logs = jobs.job_info(address, job_id)
    progress = [ln for ln in logs.splitlines() if ln.startswith("progress:")]
    click.echo(f"job {job_id}: {state.value}" + (f" ({message})" if message else ""))
    if progress:
        click.echo(progress[-1])


@contextlib.contextmanager
def _jobs_api(address: str | None):
    """Errors of Ray's Jobs API (token refused, no dashboard, unknown job) as
    one clear line, not a traceback."""
    from ray.exceptions import AuthenticationError

    from segbatch.engine import submit as jobs

    try:
        yield
    except AuthenticationError as exc:  # its text says which token is missing or wrong, and how to give it
        raise click.ClickException(f"{jobs.dashboard_address(address)} refused the request. {exc}") from None
    except (ConnectionError, RuntimeError) as exc:  # the SDK's "Failed to connect", "Request failed with status 404: ..."
        raise click.ClickException(f"Ray Jobs API at {jobs.dashboard_address(address)}: {exc}") from None


if __name__ == "__main__":
    main()
