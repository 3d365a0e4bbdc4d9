"""One night's segbatch job on a standing Ray cluster, through Ray's Jobs API.

What a scheduler's task does (``jobs/airflow_nightly_dag.py`` calls
``run_nightly``): submit the night's job (``segbatch run`` for the day, then
``segbatch publish`` of its DEST to the analysts' Iceberg table), wait for it,
and raise ``NightlyJobFailed`` when the job ends in any state but SUCCEEDED, so
the scheduler marks the task failed (and retries or pages, as it is set up to).

A scheduler retries a task, or restarts it after its worker died, without
knowing what the last try left on the cluster. So each try first looks at the
jobs of the earlier tries of the same day (their submission ids are
``<prefix>-try<N>``) and

- waits for one that is still pending or running, instead of starting a
  second job on the same DEST;
- succeeds at once if one succeeded (clearing a finished task reruns nothing);
- otherwise submits its own job. That is safe because segbatch resumes: a new
  job on the same DEST runs only the shards that are not committed yet.

The scheduler's machine needs ``ray[default]`` (the Jobs API client, of the
cluster's Ray version), not segbatch: the job runs the ``segbatch`` of the
cluster's image. Plain Python and Ray's client, no scheduler imports, so the
decision can be tested without a scheduler installed.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # Ray is imported by the caller, at run time: parsing a DAG stays light
    from ray.job_submission import JobStatus, JobSubmissionClient

# Ray's JobStatus is a str enum: its members equal these names.
SUCCEEDED = "SUCCEEDED"
ACTIVE = {"PENDING", "RUNNING"}
LOG_LINES_ON_FAILURE = 20


class NightlyJobFailed(Exception):
    """The night's Ray job ended FAILED or STOPPED (or an earlier try's did and
    this try may not submit another)."""


@dataclass(frozen=True)
class NightlyRun:
    """One try of one night's job.

    ``prefix`` names the night (``segbatch-nightly-2026-11-30``); ``attempt``
    is the scheduler's try number, from 1 (Airflow's ``ti.try_number``).
    """

    address: str
    entrypoint: str
    prefix: str
    attempt: int

    def submission_id(self, attempt: int) -> str:
        return f"{self.prefix}-try{attempt}"

    def all_tries(self) -> list[str]:
        """The submission ids of this try and the earlier ones, oldest first."""
        return [self.submission_id(n) for n in range(1, self.attempt + 1)]


def night_of(moment: datetime) -> str:
    """The day (YYYY-MM-DD, UTC) a run at ``moment`` is for: the day before,
    whose photos are complete by then (as infra/kuberay/cronjob.yaml does)."""
    return (moment.astimezone(timezone.utc) - timedelta(days=1)).date().isoformat()


def segbatch_run_entrypoint(config: str, source: str, dest: str) -> str:
    """``segbatch run --config CONFIG SOURCE DEST``: the job config baked into the
    cluster's image, with the night's SOURCE and DEST (they override its own)."""
    return shlex.join(["segbatch", "run", "--config", config, source, dest])


def nightly_entrypoint(config: str, source: str, dest: str, *, iceberg: str | None) -> str:
    """The night's job: ``segbatch run``, then, if it exited 0 and ``iceberg``
    names a table (CATALOG.NAMESPACE.TABLE), ``segbatch publish DEST --iceberg
    TABLE``; ``iceberg=None`` runs only the run.

    One shell command (Ray runs an entrypoint with ``shell=True``), so a failed
    publish fails the Ray job and the scheduler's task with it, and an
    incomplete run is never published. A retried night publishes again: that
    adds only the files the table lacks. The catalog comes from the Ray head's
    environment (``PYICEBERG_CATALOG__<NAME>__*``), not from the job's record.
    """
    run = segbatch_run_entrypoint(config, source, dest)
    if iceberg is None:
        return run
    return f"{run} && {shlex.join(['segbatch', 'publish', dest, '--iceberg', iceberg])}"


@dataclass(frozen=True)
class Decision:
    """What a try does: ``submit`` a new job, ``attach`` to (wait for) a running
    one, or be ``done`` because one succeeded."""

    action: Literal["submit", "attach", "done"]
    submission_id: str


def decide(run: NightlyRun, known: Mapping[str, JobStatus]) -> Decision:
    """The try's action, from the statuses Ray knows for the night's submission ids.

    ``known`` holds the jobs Ray has (by submission id); a missing id was never
    submitted. Raises ``NightlyJobFailed`` if this very try's id already ended
    unsuccessfully: Ray refuses a reused id, and a scheduler's retry comes
    with a new try number.
    """
    ours = [sid for sid in run.all_tries() if sid in known]
    for sid in reversed(ours):
        if known[sid] == SUCCEEDED:
            return Decision("done", sid)
    for sid in reversed(ours):
        if known[sid] in ACTIVE:
            return Decision("attach", sid)
    this_try = run.submission_id(run.attempt)
    if this_try in known:
        raise NightlyJobFailed(
            f"Ray job {this_try} already ended {known[this_try]}; retry the task (a new try submits a new job)"
        )
    return Decision("submit", this_try)


def run_nightly(
    run: NightlyRun,
    client: JobSubmissionClient,
    *,
    poll_seconds: float = 30.0,
    log: Callable[[str], None] = lambda line: None,
) -> str:
    """Submit or attach to the night's job and wait for it; returns its
    submission id when it SUCCEEDED, raises ``NightlyJobFailed`` otherwise."""
    wanted = set(run.all_tries())
    known = {j.submission_id: j.status for j in client.list_jobs() if j.submission_id in wanted}
    decision = decide(run, known)
    sid = decision.submission_id
    if decision.action == "done":
        log(f"Ray job {sid} already succeeded: nothing to run")
        return sid
    if decision.action == "submit":
        client.submit_job(
            entrypoint=run.entrypoint, submission_id=sid, metadata={"tool": "segbatch", "night": run.prefix}
        )
        log(f"submitted Ray job {sid} to {run.address}: {run.entrypoint}")
    else:
        log(f"Ray job {sid} of an earlier try is {known[sid]}: waiting for it")
    return wait(client, sid, poll_seconds=poll_seconds, log=log)


def wait(
    client: JobSubmissionClient, sid: str, *, poll_seconds: float, log: Callable[[str], None] = lambda line: None
) -> str:
    """Poll the job's status until it ends (a status call is small; the log is
    read once, at the end). Returns ``sid`` if it SUCCEEDED; raises
    ``NightlyJobFailed`` with Ray's message and the end of the job's log if not."""
    last = None
    while True:
        status = client.get_job_status(sid)
        if status != last:
            log(f"Ray job {sid}: {status}")
            last = status
        if status not in ACTIVE:
            break
        time.sleep(poll_seconds)
    lines = client.get_job_logs(sid).splitlines()
    progress = [line for line in lines if line.startswith("progress:")]
    if progress:
        log(progress[-1])
    if status == SUCCEEDED:
        return sid
    message = client.get_job_info(sid).message or ""
    tail = "\n".join(lines[-LOG_LINES_ON_FAILURE:])
    raise NightlyJobFailed(f"Ray job {sid} ended {status}: {message}\n{tail}".rstrip())
