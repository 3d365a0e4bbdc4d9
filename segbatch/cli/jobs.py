"""The commands that run a job: ``run``, ``status``, ``submit`` and ``demo``."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import click

from segbatch import schema
from segbatch.config import JobConfig, ModelConfig
from segbatch.errors import StorageFault
from segbatch.redact import redact

from . import options
from .progress import ProgressDisplay, duration


@click.command()
@click.argument("source", required=False)
@click.argument("dest", required=False)
@options.job_options
@click.pass_context
def run(ctx: click.Context, source: str | None, dest: str | None, **params) -> None:
    """Segment every image under SOURCE into Parquet files under DEST.

    SOURCE: a folder, a glob, an fsspec URL prefix (s3://bucket/prefix/) or a
    manifest (.txt, or .csv/.parquet with a uri column), or a STAC Item,
    ItemCollection, Collection or Catalog JSON (each item's --stac-asset).
    DEST: a path or URL.
    """
    cfg = options.build_config(ctx, source, dest, params)
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
        f"{s.rows} rows ({s.errors} with errors, {s.detections} detections) in {redact(cfg.dest)}; "
        f"{s.images_this_run} images this run in {s.wall_s:.1f} s ({s.images_per_s_this_run:.2f} images/s)",
        err=True,
    )
    if s.tiles_skipped_nodata or s.tiles_skipped_aoi:
        click.echo(
            f"{s.tiles_skipped_nodata} tiles skipped as all nodata, {s.tiles_skipped_aoi} outside --aoi", err=True
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


@click.command()
@click.argument("dest", required=False)
@options.storage_options
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON.")
@click.option("--job", "job_id", default=None, help="A submission id from `segbatch submit --no-wait`.")
@click.option("--address", default=None, help="The cluster's Jobs API, with --job.")
@click.option("--follow", is_flag=True, help="With --job: stream the logs until the job ends.")
def status(dest, storage_options, as_json, job_id, address, follow) -> None:
    """Progress and summary of the job writing DEST (running or finished),
    or, with --job, of a job submitted to a cluster."""
    from segbatch.engine import JobStore
    from segbatch.storage import Storage

    if job_id:
        job_status(job_id, address, follow)
        return
    if not dest:
        raise click.UsageError("give DEST, or --job ID")

    store = JobStore(dest, Storage(storage_options or {}))
    # plan.json only: the counts, not the URIs (30 million of them would take seconds and gigabytes).
    # Read-only: a clear under way (another run's --overwrite) is left to its driver
    plan = store.plan_info()
    if plan is None and store.clearing():
        raise click.ClickException(
            f"{dest} is being cleared by a run with --overwrite (or one that was cut short: the next "
            "`segbatch run` on it finishes the clear); ask again once that run has started"
        )
    if plan is None:
        raise click.ClickException(f"{redact(dest)} holds no segbatch job (no _segbatch/plan.json)")
    scenes = store.read_scenes()  # a tiled job: its shards hold tiles, its rows are scenes
    if scenes:
        store = JobStore(dest, store.storage, tiled=True)
    records = store.commit_records()
    progress = store.read_progress() or {}
    summary = store.read_summary()
    total, num_shards = int(plan["num_uris"]), int(plan["num_shards"])
    done = sum(r.rows for r in records)
    state = {
        "dest": dest,
        "images": total,
        "images_committed": done,
        "shards": num_shards,
        "shards_committed": len(records),
        "plan_complete": bool(plan["complete"]),
        "errors": sum(r.errors for r in records),
        "detections": sum(r.detections for r in records),
        "running": summary is None or (progress.get("updated", 0) > summary.finished),
        "progress": progress,
        "summary": None if summary is None else summary.to_json(),
    }
    unit = "tiles" if scenes else "images"
    if scenes:
        merged = store.scene_records()
        state.update(scenes=len(scenes), scenes_merged=len(merged), detections=sum(r.detections for r in merged))
    if as_json:
        click.echo(json.dumps(state, indent=2))
        return
    pct = 100.0 * done / total if total else 100.0
    click.echo(f"{dest}: {done}/{total} {unit} committed ({pct:.1f}%), shards {len(records)}/{num_shards}")
    if not plan["complete"]:  # the driver plans while it lists SOURCE (engine/planner.py)
        click.echo(f"  the plan is not whole yet: {total} {unit} planned so far (SOURCE is listed as the job runs)")
    if scenes:
        click.echo(f"  scenes merged: {state['scenes_merged']}/{state['scenes']}")
        if progress.get("tiles_skipped"):
            click.echo(f"  tiles skipped (all nodata, or outside --aoi): {progress['tiles_skipped']}")
    click.echo(f"  {state['errors']} {unit} with errors, {state['detections']} detections")
    if progress:
        age = time.time() - progress.get("updated", 0)
        eta = progress.get("eta_s")
        click.echo(
            f"  last progress {age:.0f} s ago: {progress.get('images_per_s', 0):.2f} images/s, "
            f"ETA {'-' if eta is None else duration(eta)}, {progress.get('workers', 0)} workers"
            + (f" [{progress['message']}]" if progress.get("message") else "")
        )
    if summary:
        state_text = "complete" if summary.complete else "incomplete"
        click.echo(f"  last run: {state_text}, {summary.wall_s:.1f} s, {summary.images_per_s_this_run:.2f} images/s")
        for shard, error in summary.failed_shards.items():
            click.echo(f"  failed shard {shard}: {error}")
        for scene, error in (summary.failed_scenes or {}).items():
            click.echo(f"  scene not merged {scene}: {error}")


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option(
    "--address", default=None, help="The cluster's Jobs API, e.g. http://HEAD:8265 [default: RAY_ADDRESS or local]."
)
@click.option(
    "--no-wait", is_flag=True, help="Print the submission id and return; follow with `segbatch status --job ID`."
)
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
    options.build_config(ctx, ctx.params.pop("source"), ctx.params.pop("dest"), dict(ctx.params))
    jobs.refuse_secrets(list(run_args), list(pip_packages), submission_id)  # before any connection
    with jobs_api(address):
        client, job_id = jobs.submit(
            address, list(run_args), submission_id=submission_id, env=jobs.runtime_env(list(pip_packages))
        )
    click.echo(f"submitted {job_id} to {jobs.dashboard_address(address)}", err=True)
    if no_wait:
        click.echo(job_id)
        return
    with jobs_api(address):
        final = jobs.follow(client, job_id, lambda line: click.echo(redact(line)))
    click.echo(f"job {job_id}: {final.value}", err=True)
    sys.exit(0 if final.value == "SUCCEEDED" else 1)


@click.command()
@click.argument("dest")
@click.option("--count", type=int, default=24, show_default=True, help="Scenes to generate.")
@click.option("--seed", type=int, default=2026, show_default=True, help="Scene seed (the demo model never saw 2026).")
@options.model
@options.workers
@options.progress
def demo(dest: str, count: int, seed: int, model: str, workers: int, progress: str) -> None:
    """Generate scenes with ground truth, segment them, print the mask AP, render overlays.

    Writes DEST/_demo/images/, DEST/_demo/ground_truth.json (COCO), the
    results in DEST/data/, overlay pictures in DEST/_render/ and the page
    DEST/report.html. Works offline.
    """
    from segbatch.outputs import evaluate, read_rows, write_report
    from segbatch.storage import Storage, is_local, join
    from segbatch.train import write_dataset

    from .results import ap_text, render_to

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
    click.echo(ap_text(figures))
    overlays = join(dest, "_render")  # the demo's own DEST: its pictures live beside its results
    written = render_to(dest, overlays, 6, (), 0.5, 0, storage)
    click.echo(f"overlays: {len(written)} pictures in {overlays}", err=True)
    page, _ = write_report(dest, join(dest, "report.html"), storage)
    click.echo(f"report: {page} (open it in a browser)", err=True)
    click.echo(f"results: {join(dest, schema.DATA)} (read with pandas.read_parquet or DuckDB)", err=True)


def job_status(job_id: str, address: str | None, follow: bool) -> None:
    from segbatch.engine import submit as jobs

    if follow:
        from ray.job_submission import JobSubmissionClient

        with jobs_api(address):
            client = JobSubmissionClient(jobs.dashboard_address(address))
            final = jobs.follow(client, job_id, lambda line: click.echo(redact(line)))
        click.echo(f"job {job_id}: {final.value}", err=True)
        sys.exit(0 if final.value == "SUCCEEDED" else 1)
    with jobs_api(address):
        state, message, logs = jobs.job_info(address, job_id)
    progress = [ln for ln in logs.splitlines() if ln.startswith("progress:")]
    click.echo(f"job {job_id}: {state.value}" + (f" ({message})" if message else ""))
    if progress:
        click.echo(progress[-1])


@contextlib.contextmanager
def jobs_api(address: str | None):
    """Errors of Ray's Jobs API (token refused, no dashboard, unknown job) as
    one clear line, not a traceback."""
    from ray.exceptions import AuthenticationError

    from segbatch.engine import submit as jobs

    try:
        yield
    except AuthenticationError as exc:  # its text says which token is missing or wrong, and how to give it
        raise click.ClickException(f"{jobs.dashboard_address(address)} refused the request. {exc}") from None
    except (
        ConnectionError,
        RuntimeError,
    ) as exc:  # the SDK's "Failed to connect", "Request failed with status 404: ..."
        raise click.ClickException(f"Ray Jobs API at {jobs.dashboard_address(address)}: {exc}") from None
