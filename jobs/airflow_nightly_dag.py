"""Airflow DAG: segbatch's nightly retail job on a standing Ray cluster.

Every night at 02:00 UTC the task ``segment`` submits, through Ray's Jobs API,
one Ray job for the day before: ``segbatch run --config jobs/retail-nightly.yaml``
and, once that run completed, ``segbatch publish`` of its DEST to the Iceberg
table ``ICEBERG_TABLE``. The task waits for the job and fails when it ends FAILED
or STOPPED (the run or the publish failed); Airflow then retries it (a retry
resumes the same DEST, then publishes it) and, after the last retry, marks the
run failed and alerts as the deployment is set up to (``on_failure_callback``,
email, ...). The work is in ``nightly_ray_job.py`` beside this file (copy both into the
DAGs folder): why a Python task with Ray's client rather than ``segbatch
submit`` in a BashOperator is said there and in infra/README.md.

Setup on the Airflow workers: ``pip install "ray[default]==<the cluster's Ray>"``;
``SEGBATCH_RAY_ADDRESS``: the cluster's Jobs API (for infra/kuberay/raycluster.yaml,
``http://segbatch-head-svc.<namespace>:8265``); with Ray's token auth,
``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN`` from a secret. The publish runs
on the Ray head: its pod needs the catalog's ``PYICEBERG_CATALOG__LAKE__*``
variables (infra/README.md).
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import pendulum
from nightly_ray_job import NightlyRun, night_of, nightly_entrypoint, run_nightly

try:  # Airflow 3
    from airflow.sdk import dag, task
except ImportError:  # Airflow 2.x
    from airflow.decorators import dag, task

# REPLACE: where the night's photos are and where its results go; {day} is YYYY-MM-DD.
SOURCE = "s3://retail-shelves/incoming/{day}/"
DEST = "s3://retail-shelves/segments/{day}/"
CONFIG = "/home/ray/segbatch/jobs/retail-nightly.yaml"  # in the cluster's image (infra/Dockerfile)
# REPLACE: the analysts' Iceberg table (CATALOG.NAMESPACE.TABLE) each completed night is
# published to, the catalog named `lake` configured on the Ray head; None: no publish.
ICEBERG_TABLE: str | None = "lake.retail.shelf_segments"
POLL_SECONDS = float(os.environ.get("SEGBATCH_POLL_SECONDS", "60"))  # how often the task asks Ray

log = logging.getLogger(__name__)


@dag(
    dag_id="segbatch_nightly",
    schedule="0 2 * * *",
    start_date=pendulum.datetime(2026, 12, 1, tz="UTC"),
    catchup=False,  # a missed night is run by hand (trigger with a logical date), not all at once
    max_active_runs=1,  # never two nights on the cluster at once
    default_args={
        "retries": 2,  # each retry submits a new Ray job on the same DEST: it resumes
        "retry_delay": timedelta(minutes=10),
        "execution_timeout": timedelta(hours=20),
    },
    tags=["segbatch"],
)
def segbatch_nightly():
    @task
    def segment(ti=None, logical_date=None, dag_run=None) -> str:
        """Run (and publish) the night's job on the Ray cluster; its submission id goes to XCom."""
        day = night_of(logical_date or dag_run.run_after)
        run = NightlyRun(
            address=os.environ.get("SEGBATCH_RAY_ADDRESS", "http://127.0.0.1:8265"),
            entrypoint=nightly_entrypoint(CONFIG, SOURCE.format(day=day), DEST.format(day=day), iceberg=ICEBERG_TABLE),
            prefix=f"segbatch-nightly-{day}",
            attempt=ti.try_number,
        )
        from ray.job_submission import JobSubmissionClient  # at run time, not when the DAG is parsed

        return run_nightly(run, JobSubmissionClient(run.address), poll_seconds=POLL_SECONDS, log=log.info)

    segment()


segbatch_nightly()
