"""The KubeRay manifests against KubeRay's own CRD schemas, and the nightly CronJob.

No Kubernetes here. The RayJob / RayCluster manifests are validated with
`jsonschema` against the openAPIV3Schema of KubeRay's CRDs, kept (fetched, not committed) in
../shared/kuberay-schema/ from KubeRay's repository (infra/kuberay/SCHEMA.md names the release).
Every object that lists its properties is closed, as the API server's strict
field validation (`kubectl apply`'s default) refuses unknown fields: a typo'd
key fails here as it would on the cluster.

The CronJob's pod template is validated against the core/v1 PodTemplateSpec
schema that KubeRay's RayJob CRD embeds (its `submitterPodTemplate`); the
CronJob and Job fields around it are checked against Kubernetes' batch/v1 field
names and rules by hand. Its script runs here for real under /bin/sh, with a
stand-in `kubectl` that keeps RayJobs as files: the RayJob it creates is
validated against the CRD schema, and its exit status is checked for a job
that succeeds, one that fails, one that is retried and one that already exists.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import stat
import subprocess
import sys
import zoneinfo
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import standin
import yaml

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema comes with ray[default]")

ROOT = Path(__file__).resolve().parent.parent
KUBERAY = ROOT / "infra" / "kuberay"
# KubeRay's own files stay out of this repository (infra/kuberay/SCHEMA.md says how to get them)
SCHEMA = Path(os.environ.get("SEGBATCH_KUBERAY_SCHEMA", ROOT.parent / "shared" / "kuberay-schema"))
KUBERAY_SCHEMA_VERSION = "v1.4.2"


def _closed(schema):
    """The schema with every object that lists its properties closed to others
    (unless it says x-kubernetes-preserve-unknown-fields), as strict field
    validation treats them."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _crd_schema(name: str) -> dict:
    """KubeRay's CRD schema ``name``; the test is skipped, saying why, where it was not fetched."""
    if not (SCHEMA / name).exists():
        pytest.skip(f"KubeRay's CRD schema {name} is not in {SCHEMA}: see infra/kuberay/SCHEMA.md to fetch it")
    return json.loads((SCHEMA / name).read_text())


def _validator(name: str) -> jsonschema.Draft4Validator:
    """The validator of KubeRay's CRD schema (OpenAPI v3.0 schemas are draft-4 JSON Schema)."""
    schema = _closed(_crd_schema(name))
    return jsonschema.Draft4Validator(schema)


@pytest.fixture(scope="module")
def rayjob_schema():
    return _validator("ray.io_rayjobs.v1.json")


@pytest.fixture(scope="module")
def raycluster_schema():
    return _validator("ray.io_rayclusters.v1.json")


@pytest.fixture(scope="module")
def pod_template_schema():
    """core/v1 PodTemplateSpec, as KubeRay's RayJob CRD embeds it."""
    schema = _closed(_crd_schema("ray.io_rayjobs.v1.json"))
    return jsonschema.Draft4Validator(schema["properties"]["spec"]["properties"]["submitterPodTemplate"])


def _errors(validator, doc) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def _docs(name: str) -> dict[str, list[dict]]:
    by_kind: dict[str, list[dict]] = {}
    for doc in yaml.safe_load_all((KUBERAY / name).read_text()):
        if doc:
            by_kind.setdefault(doc["kind"], []).append(doc)
    return by_kind


def _one(name: str, kind: str) -> dict:
    (doc,) = _docs(name)[kind]
    return doc


def _nightly_template(day: str) -> dict:
    cm = _one("cronjob.yaml", "ConfigMap")
    return yaml.safe_load(cm["data"]["rayjob.yaml"].replace("__DAY__", day))


def _nightly_commands(day: str) -> list[list[str]]:
    """The commands of the nightly entrypoint (``sh -c 'A && B'``), in order."""
    outer = shlex.split(_nightly_template(day)["spec"]["entrypoint"])
    assert outer[:2] == ["sh", "-c"] and len(outer) == 3, outer
    commands: list[list[str]] = [[]]
    for token in shlex.split(outer[2]):
        if token == "&&":
            commands.append([])
        else:
            commands[-1].append(token)
    return commands


# -- the vendored schemas --------------------------------------------------------------


def test_schemas_name_their_kuberay_release():
    readme = (KUBERAY / "SCHEMA.md").read_text()
    assert f"KubeRay {KUBERAY_SCHEMA_VERSION}" in readme
    assert f"github.com/ray-project/kuberay/tree/{KUBERAY_SCHEMA_VERSION}/ray-operator/config/crd/bases" in readme
    for name in ("ray.io_rayjobs.v1.json", "ray.io_rayclusters.v1.json"):
        schema = _crd_schema(name)
        jsonschema.Draft4Validator.check_schema(schema)
        assert {"apiVersion", "kind", "metadata", "spec", "status"} <= set(schema["properties"])


# -- RayJob and RayCluster against the CRDs -------------------------------------------


def test_raycluster_manifest_validates_against_the_crd(raycluster_schema):
    assert _errors(raycluster_schema, _one("raycluster.yaml", "RayCluster")) == []


def test_rayjob_manifest_validates_against_the_crd(rayjob_schema):
    assert _errors(rayjob_schema, _one("rayjob.yaml", "RayJob")) == []


def test_nightly_rayjob_template_validates_against_the_crd(rayjob_schema):
    job = _nightly_template("2026-11-30")
    assert _errors(rayjob_schema, job) == []
    assert job["metadata"]["name"] == "segbatch-nightly-2026-11-30"


def test_rayjob_retries_on_a_new_cluster_and_tears_it_down():
    """What unattended runs rely on: a failed job is retried (each retry on a new
    cluster; resume makes it safe) and no cluster is left running after."""
    for spec in (_one("rayjob.yaml", "RayJob")["spec"], _nightly_template("2026-11-30")["spec"]):
        assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 1
        assert spec["shutdownAfterJobFinishes"] is True
        assert 0 <= spec["ttlSecondsAfterFinished"] <= 3600
        assert spec["submissionMode"] == "K8sJobMode"
        # KubeRay does not retry a job that ran past its deadline: a deadline, if any, spans the retries.
        assert "activeDeadlineSeconds" not in spec or spec["activeDeadlineSeconds"] >= 3600


def test_nightly_template_runs_rayjobs_cluster():
    """The nightly RayJob's cluster is rayjob.yaml's, so the two do not drift apart."""
    assert (
        _nightly_template("2026-11-30")["spec"]["rayClusterSpec"]
        == _one("rayjob.yaml", "RayJob")["spec"]["rayClusterSpec"]
    )


def test_nightly_entrypoint_is_the_retail_config_for_that_day():
    from segbatch import cli

    args = _nightly_commands("2026-11-30")[0]
    assert args[:4] == ["segbatch", "run", "--config", "/home/ray/segbatch/jobs/retail-nightly.yaml"]
    # the image's /home/ray/segbatch/jobs/ is this repository's jobs/ (infra/Dockerfile)
    args[3] = str(ROOT / "jobs" / "retail-nightly.yaml")
    ctx = cli.run.make_context("run", args[2:])
    params = dict(ctx.params)
    source, dest = params.pop("source"), params.pop("dest")
    with ctx:
        cfg = cli.build_config(ctx, source, dest, params)
    assert cfg.source == "s3://retail-shelves/incoming/2026-11-30/"
    assert cfg.dest == "s3://retail-shelves/segments/2026-11-30/"
    assert cfg.model.device == "cuda" and cfg.workers >= 1


def test_nightly_entrypoint_publishes_the_days_dest_after_the_run():
    """`segbatch run ... && segbatch publish DEST --iceberg TABLE`: the run's DEST, after it succeeded."""
    from segbatch.cli import results

    run, publish = _nightly_commands("2026-11-30")
    assert publish == [
        "segbatch",
        "publish",
        "s3://retail-shelves/segments/2026-11-30/",
        "--iceberg",
        "lake.retail.shelf_segments",
    ]
    assert run[-1] == publish[2]  # the DEST `segbatch run` wrote
    ctx = results.publish.make_context("publish", publish[2:])  # segbatch publish's own options
    assert ctx.params["dest"] == publish[2] and ctx.params["table_name"] == publish[4]
    assert "PYICEBERG_CATALOG__LAKE__URI" in _one("cronjob.yaml", "ConfigMap")["data"]["rayjob.yaml"]


@pytest.mark.parametrize(
    "path, value, complaint",
    [
        (("spec", "backoffLimit"), "three", "is not of type 'integer'"),
        (("spec", "shutdownAfterJobFinish"), True, "Additional properties are not allowed"),
        (("spec", "entrypoint"), ["segbatch", "run"], "is not of type 'string'"),
        (("spec", "rayClusterSpec", "headGroupSpec", "rayStartParams", "num-cpus"), 0, "is not of type 'string'"),
        (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "maxReplica"), 8, "Additional properties are not allowed"),
        (
            ("spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "imagePullPolicy"),
            3,
            "is not of type 'string'",
        ),
    ],
    ids=["backoffLimit-string", "typo", "entrypoint-list", "rayStartParams-int", "group-typo", "container-field"],
)
def test_the_crd_check_refuses_wrong_fields(rayjob_schema, path, value, complaint):
    """The check has teeth: what the API server would refuse fails here."""
    job = copy.deepcopy(_one("rayjob.yaml", "RayJob"))
    node = job
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    errors = _errors(rayjob_schema, job)
    assert errors and any(complaint in e for e in errors), errors


# -- the CronJob: Kubernetes batch/v1 ---------------------------------------------------

CRONJOB_SPEC_FIELDS = {
    "schedule",
    "timeZone",
    "startingDeadlineSeconds",
    "concurrencyPolicy",
    "suspend",
    "jobTemplate",
    "successfulJobsHistoryLimit",
    "failedJobsHistoryLimit",
}
JOB_SPEC_FIELDS = {
    "parallelism",
    "completions",
    "activeDeadlineSeconds",
    "podFailurePolicy",
    "successPolicy",
    "backoffLimit",
    "backoffLimitPerIndex",
    "maxFailedIndexes",
    "selector",
    "manualSelector",
    "template",
    "ttlSecondsAfterFinished",
    "completionMode",
    "suspend",
    "podReplacementPolicy",
    "managedBy",
}
CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _cronjob() -> dict:
    return _one("cronjob.yaml", "CronJob")


def _check_cronjob(cj: dict, pod_template_schema) -> None:
    """batch/v1 CronJob: its required fields, field names and the rules the API server enforces."""
    assert cj["apiVersion"] == "batch/v1"
    assert DNS_LABEL.match(cj["metadata"]["name"]) and len(cj["metadata"]["name"]) <= 52  # CronJob's limit
    spec = cj["spec"]
    assert set(spec) <= CRONJOB_SPEC_FIELDS, set(spec) - CRONJOB_SPEC_FIELDS
    fields = spec["schedule"].split()
    assert len(fields) == 5 and all(CRON_FIELD.match(f) for f in fields), spec["schedule"]
    if "timeZone" in spec:
        assert spec["timeZone"] in zoneinfo.available_timezones()
    assert spec.get("concurrencyPolicy", "Allow") in {"Allow", "Forbid", "Replace"}
    job = spec["jobTemplate"]
    assert set(job) <= {"metadata", "spec"}
    job_spec = job["spec"]
    assert set(job_spec) <= JOB_SPEC_FIELDS, set(job_spec) - JOB_SPEC_FIELDS
    for key in ("backoffLimit", "activeDeadlineSeconds"):
        assert key not in job_spec or (isinstance(job_spec[key], int) and job_spec[key] >= 0)
    template = job_spec["template"]
    errors = _errors(pod_template_schema, template)
    assert errors == [], errors
    pod = template["spec"]
    assert pod["restartPolicy"] in {"OnFailure", "Never"}, "a Job's pods may not restart Always"
    names = {c["name"] for c in pod["containers"]}
    for rule in job_spec.get("podFailurePolicy", {}).get("rules", []):
        assert pod["restartPolicy"] == "Never", "podFailurePolicy needs restartPolicy: Never"
        assert rule["action"] in {"FailJob", "FailIndex", "Ignore", "Count"}
        codes = rule["onExitCodes"]
        assert codes.get("containerName", next(iter(names))) in names
        assert codes["operator"] in {"In", "NotIn"} and codes["values"] and 0 not in codes["values"]


def test_cronjob_is_a_valid_batch_v1_cronjob(pod_template_schema):
    _check_cronjob(_cronjob(), pod_template_schema)


def test_cronjob_check_refuses_wrong_fields(pod_template_schema):
    cases = {
        "six-field schedule": ("spec", "schedule", "0 0 2 * * *"),
        "unknown zone": ("spec", "timeZone", "Europe/Atlantis"),
        "typo'd spec field": ("spec", "concurencyPolicy", "Forbid"),
        "pod restarts Always": ("pod", "restartPolicy", "Always"),
        "container field typo": ("container", "imagee", "x"),
    }
    for what, (where, key, value) in cases.items():
        cj = copy.deepcopy(_cronjob())
        target = {
            "spec": cj["spec"],
            "pod": cj["spec"]["jobTemplate"]["spec"]["template"]["spec"],
            "container": cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0],
        }[where]
        target[key] = value
        with pytest.raises(AssertionError):
            _check_cronjob(cj, pod_template_schema)
            pytest.fail(f"{what}: not refused")


def test_cronjob_runs_nightly_one_at_a_time():
    spec = _cronjob()["spec"]
    minute, hour, dom, month, dow = spec["schedule"].split()
    assert (dom, month, dow) == ("*", "*", "*") and minute.isdigit() and hour.isdigit()
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["timeZone"] == "Etc/UTC", "the script names the day in UTC: keep the two together"


def test_cronjob_may_create_rayjobs_and_nothing_else():
    docs = _docs("cronjob.yaml")
    pod = _cronjob()["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    sa = pod["serviceAccountName"]
    assert sa in {d["metadata"]["name"] for d in docs["ServiceAccount"]}
    (role,) = docs["Role"]
    (binding,) = docs["RoleBinding"]
    assert role["apiVersion"] == binding["apiVersion"] == "rbac.authorization.k8s.io/v1"
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa}]
    (rule,) = role["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"]
    script = pod["containers"][0]["args"][0]
    used = set(re.findall(r"kubectl (\w+)", script))
    assert used == set(rule["verbs"]), f"the script runs kubectl {used}; the Role grants {rule['verbs']}"


def test_cronjob_mounts_the_template_it_reads():
    cm = _one("cronjob.yaml", "ConfigMap")
    pod = _cronjob()["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if volumes[m["name"]].get("configMap")]
    assert volumes[mount["name"]]["configMap"]["name"] == cm["metadata"]["name"]
    (key,) = cm["data"]
    assert env["SEGBATCH_RAYJOB_TEMPLATE"] == f"{mount['mountPath']}/{key}"


def test_ray_pods_service_account_is_the_same_in_every_manifest():
    sas = [
        sa
        for name in ("rayjob.yaml", "raycluster.yaml", "cronjob.yaml")
        for sa in _docs(name)["ServiceAccount"]
        if sa["metadata"]["name"] == "segbatch"
    ]
    assert len(sas) == 3 and all(sa == sas[0] for sa in sas)


# -- the CronJob's script, run with a stand-in kubectl ------------------------------------

FAKE_KUBECTL = """#!{python}
# A stand-in for kubectl: RayJobs are files in $FAKE_K8S; `get -o jsonpath` answers
# the next line of $FAKE_K8S/states (jobDeploymentStatus/jobStatus).
import os, sys, yaml
root = os.environ["FAKE_K8S"]
with open(os.path.join(root, "calls"), "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
args = sys.argv[1:]
if args[:2] == ["create", "-f"] and args[2] == "-":
    doc = yaml.safe_load(sys.stdin.read())
    path = os.path.join(root, doc["metadata"]["name"] + ".yaml")
    if os.path.exists(path):
        sys.exit("Error from server (AlreadyExists)")
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)
    print("rayjob.ray.io/" + doc["metadata"]["name"] + " created")
elif args[:2] == ["get", "rayjob"]:
    if not os.path.exists(os.path.join(root, args[2] + ".yaml")):
        sys.exit("Error from server (NotFound)")
    if "-o" in args and "jobDeploymentStatus" in args[-1]:
        states = open(os.path.join(root, "states")).read().split()
        print(states[0], end="")
        if len(states) > 1:
            open(os.path.join(root, "states"), "w").write("\\n".join(states[1:]))
    elif "-o" in args:
        print("AppFailed job failed", end="")
else:
    sys.exit("fake kubectl: unexpected " + " ".join(args))
"""


def _run_script(tmp_path: Path, states: list[str], existing: dict | None = None) -> tuple[int, str, Path]:
    container = _cronjob()["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["/bin/sh", "-c"]
    k8s = tmp_path / "k8s"
    bin_dir = tmp_path / "bin"
    k8s.mkdir()
    bin_dir.mkdir()
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(FAKE_KUBECTL.format(python=sys.executable))
    kubectl.chmod(kubectl.stat().st_mode | stat.S_IEXEC)
    (k8s / "states").write_text("\n".join(states))
    if existing:
        (k8s / f"{existing['metadata']['name']}.yaml").write_text(yaml.safe_dump(existing))
    template = tmp_path / "rayjob.yaml"
    template.write_text(_one("cronjob.yaml", "ConfigMap")["data"]["rayjob.yaml"])
    env = {e["name"]: e["value"] for e in container["env"]}
    env.update(SEGBATCH_RAYJOB_TEMPLATE=str(template), POLL_SECONDS="0", FAKE_K8S=str(k8s))
    env["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
    proc = subprocess.run(
        [*container["command"], container["args"][0]], env=env, capture_output=True, text=True, timeout=60
    )
    return proc.returncode, proc.stdout + proc.stderr, k8s


def _yesterday() -> str:
    return (datetime.now(timezone.utc) - timedelta(days=1)).date().isoformat()


def test_script_creates_the_days_rayjob_and_succeeds_with_it(tmp_path, rayjob_schema):
    code, out, k8s = _run_script(tmp_path, ["Initializing/", "Running/RUNNING", "Complete/SUCCEEDED"])
    assert code == 0, out
    day = _yesterday()
    (created,) = k8s.glob("segbatch-nightly-*.yaml")
    job = yaml.safe_load(created.read_text())
    assert job["metadata"]["name"] == f"segbatch-nightly-{day}"
    assert _errors(rayjob_schema, job) == []
    assert f"s3://retail-shelves/incoming/{day}/ s3://retail-shelves/segments/{day}/" in job["spec"]["entrypoint"]
    assert "__DAY__" not in created.read_text()


def test_script_waits_through_kuberays_retries(tmp_path):
    code, out, _ = _run_script(
        tmp_path, ["Running/RUNNING", "Retrying/FAILED", "Running/RUNNING", "Complete/SUCCEEDED"]
    )
    assert code == 0, out


def test_script_fails_when_the_rayjob_fails(tmp_path):
    code, out, _ = _run_script(tmp_path, ["Running/RUNNING", "Failed/FAILED"])
    assert code == 3, out  # the podFailurePolicy's FailJob code: no new pod waits for it again
    assert "failed (Failed/FAILED): AppFailed job failed" in out
    cj = _cronjob()["spec"]["jobTemplate"]["spec"]
    (rule,) = cj["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [3]


def test_script_waits_for_the_days_rayjob_instead_of_creating_another(tmp_path):
    existing = _nightly_template(_yesterday())
    code, out, k8s = _run_script(tmp_path, ["Running/RUNNING", "Complete/SUCCEEDED"], existing=existing)
    assert code == 0, out
    calls = (k8s / "calls").read_text()
    assert "create" not in calls and "exists: waiting for it" in out


# -- the nightly entrypoint, through KubeRay's submitter and Ray's job supervisor -----------

FAKE_RAY = """#!{python}
# A stand-in for `ray job status|submit`: no job was submitted yet; `submit` joins the
# entrypoint's words as Ray's CLI does (list2cmdline) and runs it as Ray's job supervisor
# does (Popen(shell=True)), marked as inside the Ray job.
import os, subprocess, sys
args = sys.argv[1:]
if args[:2] == ["job", "status"]:
    sys.exit(1)
assert args[:2] == ["job", "submit"], args
entrypoint = subprocess.list2cmdline(args[args.index("--") + 1 :])
env = dict(os.environ, FAKE_IN_RAY_JOB="1")
sys.exit(subprocess.run(entrypoint, shell=True, env=env).returncode)
"""


def _submit(tmp_path: Path, entrypoint: str, run_exit: int = 0, publish_exit: int = 0) -> tuple[int, list]:
    """The RayJob's entrypoint through KubeRay's K8sJobMode submitter: GetK8sJobCommand's
    words (KubeRay >= 1.2), the entrypoint pasted in unquoted, joined by spaces and run by
    `/bin/bash -c`; with stand-in `ray` and `segbatch`. Returns the exit status and the
    segbatch calls as (argv, ran inside the Ray job)."""
    address, sid = "http://segbatch-nightly-head-svc:8265", "segbatch-nightly-2026-11-30-abcde"
    line = (
        f"if ray job status --address {address} {sid} >/dev/null 2>&1 ; "
        f"then ray job logs --address {address} --follow {sid} ; "
        f"else ray job submit --address {address} --submission-id {sid} -- {entrypoint.strip()} ; fi"
    )
    others = {"ray": FAKE_RAY}
    return standin.run_line(tmp_path, line, "/bin/bash", others, run_exit=run_exit, publish_exit=publish_exit)


def test_the_rayjob_publishes_inside_the_job_after_a_completed_run(tmp_path):
    entrypoint = _nightly_template("2026-11-30")["spec"]["entrypoint"]
    run, publish = _nightly_commands("2026-11-30")
    code, calls = _submit(tmp_path, entrypoint)
    assert code == 0
    assert calls == [(run[1:], True), (publish[1:], True)]


def test_the_rayjob_fails_without_publishing_when_the_run_fails(tmp_path):
    run, _ = _nightly_commands("2026-11-30")
    code, calls = _submit(tmp_path, _nightly_template("2026-11-30")["spec"]["entrypoint"], run_exit=4)
    assert code == 4 and calls == [(run[1:], True)]


def test_the_rayjob_fails_when_the_publish_fails(tmp_path):
    code, calls = _submit(tmp_path, _nightly_template("2026-11-30")["spec"]["entrypoint"], publish_exit=1)
    assert code == 1 and [c[0][0] for c in calls] == ["run", "publish"]


def test_a_bare_and_and_would_publish_outside_the_ray_job(tmp_path):
    """Why the entrypoint is one `sh -c` word: unwrapped, KubeRay's bash line ends the
    `ray job submit` at `&&` and runs the publish in the submitter pod."""
    bare = shlex.split(_nightly_template("2026-11-30")["spec"]["entrypoint"])[2]
    code, calls = _submit(tmp_path, bare)
    assert code == 0 and [(c[0][0], c[1]) for c in calls] == [("run", True), ("publish", False)]
