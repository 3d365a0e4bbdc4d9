"""The Airflow DAG in jobs/ and the submit / wait / fail logic it runs.

Airflow parses the DAG here for real (`DagBag`, in a subprocess so Airflow's
logging and configuration stay out of this test session), where Airflow is
installed (the `test` extra installs it); the decision of what a scheduler's
try does on the cluster (submit, wait for an earlier try's job, or succeed at
once) is plain Python, tested without Airflow or a cluster: submitting real
Ray jobs to wait for is slow, and `decide` holds the logic.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import standin

ROOT = Path(__file__).resolve().parent.parent
JOBS = ROOT / "jobs"
DAG_FILE = JOBS / "airflow_nightly_dag.py"


def _load_nightly():
    """jobs/nightly_ray_job.py as a module (jobs/ is a DAGs folder, not a package)."""
    spec = importlib.util.spec_from_file_location("nightly_ray_job", JOBS / "nightly_ray_job.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


nightly = _load_nightly()


def _run(attempt: int) -> object:
    return nightly.NightlyRun(
        address="http://head:8265", entrypoint="segbatch run ...", prefix="segbatch-nightly-2026-11-30", attempt=attempt
    )


# -- Airflow parses the DAG ------------------------------------------------------------

PARSE = textwrap.dedent(
    """
    import json, sys
    sys.path.append(sys.argv[2])  # as Airflow does for its DAGs folder (the bundle's path)
    from airflow.models import DagBag
    try:
        bag = DagBag(dag_folder=sys.argv[1], include_examples=False)  # Airflow 2
    except TypeError:
        bag = DagBag(dag_folder=sys.argv[1])  # Airflow 3: no example DAGs unless configured
    dag = bag.dags.get("segbatch_nightly")
    out = {"errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": sorted(bag.dags)}
    if dag is not None:
        task = dag.get_task("segment")
        out.update(
            tasks={t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks},
            timetable=repr(dag.timetable),
            catchup=dag.catchup,
            max_active_runs=dag.max_active_runs,
            retries=task.retries,
            execution_timeout=task.execution_timeout.total_seconds(),
            ray_imported_at_parse="ray" in sys.modules,
        )
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def parsed_dag(tmp_path_factory):
    if importlib.util.find_spec("airflow") is None:
        reason = "apache-airflow is not installed (pip install -e '.[test]' installs it): the DAG is not parsed"
        print(reason)
        pytest.skip(reason)
    home = tmp_path_factory.mktemp("airflow_home")
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(JOBS),
    }
    proc = subprocess.run(
        [sys.executable, "-c", PARSE, str(DAG_FILE), str(JOBS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_airflow_loads_the_dag_without_errors(parsed_dag):
    assert parsed_dag["errors"] == {}
    assert parsed_dag["dags"] == ["segbatch_nightly"]


def test_dag_runs_one_task_nightly_one_night_at_a_time(parsed_dag):
    assert parsed_dag["tasks"] == {"segment": []}
    assert "0 2 * * *" in parsed_dag["timetable"] and "UTC" in parsed_dag["timetable"]
    assert parsed_dag["catchup"] is False and parsed_dag["max_active_runs"] == 1
    assert parsed_dag["retries"] >= 1  # a retry submits a new Ray job on the same DEST: it resumes
    assert parsed_dag["execution_timeout"] <= 24 * 3600


def test_parsing_the_dag_does_not_import_ray(parsed_dag):
    """The scheduler parses DAG files often: Ray's client is imported only when the task runs."""
    assert parsed_dag["ray_imported_at_parse"] is False


# -- what one try does: decide() ------------------------------------------------------------


def test_first_try_submits_its_job():
    d = nightly.decide(_run(1), {})
    assert (d.action, d.submission_id) == ("submit", "segbatch-nightly-2026-11-30-try1")


def test_a_retry_after_a_failed_job_submits_a_new_one():
    d = nightly.decide(_run(2), {"segbatch-nightly-2026-11-30-try1": "FAILED"})
    assert (d.action, d.submission_id) == ("submit", "segbatch-nightly-2026-11-30-try2")


def test_a_retry_waits_for_a_job_still_running_instead_of_starting_a_second():
    """The worker that ran try 1 died; its Ray job did not: try 2 waits for it
    (two jobs on one DEST would be refused by segbatch's lease anyway)."""
    for state in ("PENDING", "RUNNING"):
        d = nightly.decide(_run(2), {"segbatch-nightly-2026-11-30-try1": state})
        assert (d.action, d.submission_id) == ("attach", "segbatch-nightly-2026-11-30-try1")


def test_a_try_after_a_success_runs_nothing():
    known = {"segbatch-nightly-2026-11-30-try1": "FAILED", "segbatch-nightly-2026-11-30-try2": "SUCCEEDED"}
    d = nightly.decide(_run(3), known)
    assert (d.action, d.submission_id) == ("done", "segbatch-nightly-2026-11-30-try2")


def test_other_nights_and_later_tries_do_not_count():
    known = {"segbatch-nightly-2026-11-29-try1": "RUNNING", "segbatch-nightly-2026-11-30-try5": "SUCCEEDED"}
    d = nightly.decide(_run(1), known)
    assert (d.action, d.submission_id) == ("submit", "segbatch-nightly-2026-11-30-try1")


def test_a_try_whose_own_job_already_failed_fails():
    with pytest.raises(nightly.NightlyJobFailed, match=r"try2 already ended FAILED; retry the task"):
        nightly.decide(_run(2), {"segbatch-nightly-2026-11-30-try2": "FAILED"})


def test_rays_job_status_enum_works_as_the_names():
    """decide() compares with names, so the DAG file parses without importing Ray;
    Ray's JobStatus is a str enum whose members equal them."""
    from ray.job_submission import JobStatus

    d = nightly.decide(_run(2), {"segbatch-nightly-2026-11-30-try1": JobStatus.RUNNING})
    assert d.action == "attach"
    assert nightly.decide(_run(2), {"segbatch-nightly-2026-11-30-try1": JobStatus.SUCCEEDED}).action == "done"
    assert {s.value for s in JobStatus} >= nightly.ACTIVE | {nightly.SUCCEEDED, "FAILED", "STOPPED"}


def test_the_night_is_the_day_before_the_run_in_utc():
    assert nightly.night_of(datetime(2026, 12, 1, 2, 0, tzinfo=timezone.utc)) == "2026-11-30"
    # 01:30 in Tokyo on Dec 1 is 16:30 UTC on Nov 30: the night of Nov 29
    tokyo = timezone(timedelta(hours=9))
    assert nightly.night_of(datetime(2026, 12, 1, 1, 30, tzinfo=tokyo)) == "2026-11-29"


def test_the_entrypoint_is_a_segbatch_run_of_the_retail_config():
    from segbatch import cli

    ep = nightly.segbatch_run_entrypoint(
        "/home/ray/segbatch/jobs/retail-nightly.yaml",
        "s3://retail-shelves/incoming/2026-11-30/",
        "s3://retail-shelves/segments/2026-11-30/",
    )
    args = shlex.split(ep)
    assert args[:2] == ["segbatch", "run"]
    args[3] = str(JOBS / "retail-nightly.yaml")  # the image's copy of jobs/
    ctx = cli.run.make_context("run", args[2:])
    params = dict(ctx.params)
    source, dest = params.pop("source"), params.pop("dest")
    with ctx:
        cfg = cli.build_config(ctx, source, dest, params)
    assert (cfg.source, cfg.dest) == (
        "s3://retail-shelves/incoming/2026-11-30/",
        "s3://retail-shelves/segments/2026-11-30/",
    )


def _dag_constants() -> dict:
    """The DAG file's literal module constants (SOURCE, DEST, CONFIG, ICEBERG_TABLE), read
    without importing it (that needs Airflow)."""
    out = {}
    for node in ast.parse(DAG_FILE.read_text()).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Constant):
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            out[target.id] = node.value.value
    return out


def test_the_dag_runs_the_same_job_as_the_cronjob():
    """The two nightly paths (Airflow, Kubernetes CronJob) run the same commands:
    `segbatch run` of the day, then `segbatch publish` of its DEST to the same table."""
    import yaml

    cm = [
        d
        for d in yaml.safe_load_all((ROOT / "infra" / "kuberay" / "cronjob.yaml").read_text())
        if d and d["kind"] == "ConfigMap"
    ]
    entry = yaml.safe_load(cm[0]["data"]["rayjob.yaml"].replace("__DAY__", "2026-11-30"))["spec"]["entrypoint"]
    outer = shlex.split(entry)  # sh -c '...': see infra/kuberay/cronjob.yaml
    assert outer[:2] == ["sh", "-c"]
    k = _dag_constants()
    assert k["ICEBERG_TABLE"] == "lake.retail.shelf_segments"  # jobs/retail-nightly.yaml's table
    day = "2026-11-30"
    dag = nightly.nightly_entrypoint(
        k["CONFIG"], k["SOURCE"].format(day=day), k["DEST"].format(day=day), iceberg=k["ICEBERG_TABLE"]
    )
    assert shlex.split(dag) == shlex.split(outer[2])


# -- the night's entrypoint, as Ray runs it ------------------------------------------------

CONFIG = "/home/ray/segbatch/jobs/retail-nightly.yaml"
SOURCE = "s3://retail-shelves/incoming/2026-11-30/"
DEST = "s3://retail shelves/segments/2026-11-30/"  # a space: the commands are quoted
TABLE = "lake.retail.shelf_segments"


def _run_entrypoint(tmp_path: Path, entrypoint: str, run_exit: int = 0, publish_exit: int = 0) -> tuple[int, list]:
    """The entrypoint as Ray's job supervisor runs it (a shell), with a stand-in segbatch: the exit
    status and segbatch's calls (their arguments)."""
    code, calls = standin.run_line(tmp_path, entrypoint, run_exit=run_exit, publish_exit=publish_exit)
    return code, [argv for argv, _ in calls]


def test_the_night_publishes_dest_after_a_completed_run(tmp_path):
    from segbatch.cli import results

    code, calls = _run_entrypoint(tmp_path, nightly.nightly_entrypoint(CONFIG, SOURCE, DEST, iceberg=TABLE))
    assert code == 0
    assert calls == [["run", "--config", CONFIG, SOURCE, DEST], ["publish", DEST, "--iceberg", TABLE]]
    ctx = results.publish.make_context("publish", calls[1][1:])  # segbatch publish's own options
    assert (ctx.params["dest"], ctx.params["table_name"]) == (DEST, TABLE)


def test_a_failed_run_is_not_published_and_fails_the_job(tmp_path):
    code, calls = _run_entrypoint(tmp_path, nightly.nightly_entrypoint(CONFIG, SOURCE, DEST, iceberg=TABLE), run_exit=3)
    assert code == 3 and calls == [["run", "--config", CONFIG, SOURCE, DEST]]


def test_a_failed_publish_fails_the_job(tmp_path):
    """So the scheduler's task fails and its retry publishes again (adding only what is missing)."""
    code, calls = _run_entrypoint(
        tmp_path, nightly.nightly_entrypoint(CONFIG, SOURCE, DEST, iceberg=TABLE), publish_exit=1
    )
    assert code == 1 and [c[0] for c in calls] == ["run", "publish"]


def test_no_table_no_publish(tmp_path):
    entrypoint = nightly.nightly_entrypoint(CONFIG, SOURCE, DEST, iceberg=None)
    assert entrypoint == nightly.segbatch_run_entrypoint(CONFIG, SOURCE, DEST)
    code, calls = _run_entrypoint(tmp_path, entrypoint)
    assert code == 0 and calls == [["run", "--config", CONFIG, SOURCE, DEST]]


# -- against a real Ray Jobs API ---------------------------------------------------------

JOBS_API_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[2])
    import nightly_ray_job as n
    from ray.job_submission import JobSubmissionClient

    address, python = sys.argv[1], sys.argv[3]
    client = JobSubmissionClient(address)
    fail = python + " -c \\"import sys; print('progress: 1/2 images'); sys.exit(3)\\""
    ok = python + " -c \\"print('progress: 2/2 images')\\""
    slow = python + " -c \\"import time; time.sleep(4); print('progress: 2/2 images')\\""
    lines, out = [], {}

    def run(prefix, attempt, entrypoint):
        night = n.NightlyRun(address=address, entrypoint=entrypoint, prefix=prefix, attempt=attempt)
        try:
            return n.run_nightly(night, client, poll_seconds=0.5, log=lines.append)
        except n.NightlyJobFailed as exc:
            return "FAILED: " + str(exc)

    out["try1"] = run("night-a", 1, fail)
    out["try2"] = run("night-a", 2, ok)
    out["try3"] = run("night-a", 3, fail)  # try 2 succeeded: nothing is submitted
    # a worker died while try 1 of another night ran: try 2 waits for that job
    client.submit_job(entrypoint=slow, submission_id="night-b-try1")
    out["attach"] = run("night-b", 2, fail)
    out["jobs"] = sorted(j.submission_id for j in client.list_jobs())
    out["lines"] = lines
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def ray_head():
    """A one-node Ray cluster with the Jobs API (tests/engine/test_cluster.py's Cluster)."""
    from engine.test_cluster import Cluster

    cluster = Cluster()
    try:
        cluster.start_head()
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow
def test_run_nightly_against_a_real_ray_jobs_api(ray_head):
    """A failing job fails the try with the end of its log; the retry submits anew
    and succeeds; a later try submits nothing; a try finding a running job waits for it."""
    proc = subprocess.run(
        [sys.executable, "-c", JOBS_API_SCRIPT, ray_head.dashboard, str(JOBS), sys.executable],
        env=ray_head.env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT ") :])
    assert out["try1"].startswith("FAILED: Ray job night-a-try1 ended FAILED")
    assert "progress: 1/2 images" in out["try1"]  # the end of the job's log, for the task's page
    assert out["try2"] == "night-a-try2" and out["try3"] == "night-a-try2"
    assert out["attach"] == "night-b-try1"
    assert out["jobs"] == ["night-a-try1", "night-a-try2", "night-b-try1"]
    assert "Ray job night-a-try2 already succeeded: nothing to run" in out["lines"]
    assert "progress: 2/2 images" in out["lines"]


DAG_TEST = textwrap.dedent(
    """
    import json, sys
    sys.path.append(sys.argv[2])
    from airflow.models import DagBag
    dag = DagBag(dag_folder=sys.argv[1]).dags["segbatch_nightly"]
    dag.get_task("segment").retries = 0  # one try: dag.test() would wait out the retry delay
    run = dag.test()
    (ti,) = run.get_task_instances()
    print("RESULT " + json.dumps({"run": str(run.state), "task": str(ti.state), "try": ti.try_number}))
    """
)


@pytest.mark.slow
def test_the_dag_task_fails_when_the_ray_job_fails(ray_head, tmp_path):
    """Airflow runs the DAG's task (`dag.test()`) against a real Ray Jobs API; the
    night's job fails there (this cluster's nodes have no /home/ray/segbatch/jobs/
    config), so the task and the run fail."""
    if importlib.util.find_spec("airflow") is None:
        reason = "apache-airflow is not installed: the DAG is not run"
        print(reason)
        pytest.skip(reason)
    env = {
        **ray_head.env,
        "AIRFLOW_HOME": str(tmp_path),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(JOBS),
        "SEGBATCH_RAY_ADDRESS": ray_head.dashboard,
        "SEGBATCH_POLL_SECONDS": "1",
    }
    migrate = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"], env=env, capture_output=True, text=True, timeout=240
    )
    assert migrate.returncode == 0, migrate.stdout[-2000:] + migrate.stderr[-2000:]
    proc = subprocess.run(
        [sys.executable, "-c", DAG_TEST, str(DAG_FILE), str(JOBS)], env=env, capture_output=True, text=True, timeout=240
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT ") :])
    assert (out["run"], out["task"], out["try"]) == ("failed", "failed", 1), out
    logs = proc.stdout + proc.stderr
    assert "NightlyJobFailed" in logs and "-try1 ended FAILED" in logs
