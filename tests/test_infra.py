"""The deployment files: Ray's cluster launcher config, the KubeRay manifests,
the Dockerfile and the job configs.

No cloud, Kubernetes or Docker here: the launcher config goes through Ray's own
schema validation (as `ray up` does before it talks to AWS); the KubeRay
manifests are checked here for what segbatch needs of them (and in
tests/test_kuberay.py against KubeRay's own CRD schemas, vendored in
infra/kuberay/schema/); the job configs and the RayJob's entrypoint are parsed
by segbatch's own CLI.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import click
import pytest
import yaml

from segbatch import cli
from segbatch.cli.options import read_config_file
from segbatch.config import JobConfig

ROOT = Path(__file__).resolve().parent.parent
KUBERAY = ROOT / "infra" / "kuberay"
JOBS = sorted((ROOT / "jobs").glob("*.yaml"))
RAY_IMAGE_VERSION = "2.60.0"


def _run_options() -> dict[str, click.Option]:
    """`segbatch run`'s options by every spelling (--shard-size -> its Option)."""
    return {opt: p for p in cli.run.params if isinstance(p, click.Option) for opt in p.opts}


def _parse_run(args: list[str]) -> JobConfig:
    """`segbatch run ARGS` parsed by click and built into a JobConfig, as the CLI
    does, without running it."""
    ctx = cli.run.make_context("run", list(args))
    params = dict(ctx.params)
    source, dest = params.pop("source"), params.pop("dest")
    with ctx:
        return cli.build_config(ctx, source, dest, params)


# -- ray_cluster.yaml: Ray's cluster launcher --------------------------------------


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())


def test_cluster_config_passes_rays_validation(cluster_config):
    pytest.importorskip("jsonschema")  # ray[default] brings it
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(copy.deepcopy(cluster_config))
    # `ray up`: merge with the AWS defaults, check docker, fill min/max, validate.
    prepared = prepare_config(copy.deepcopy(cluster_config))
    validate_config(prepared)
    # Nothing from the defaults sneaks in: the image has everything.
    assert prepared["setup_commands"] == [] and prepared["head_setup_commands"] == []
    assert prepared["worker_setup_commands"] == []


def test_cluster_config_validation_catches_mistakes(cluster_config):
    """The check above has teeth: a typo'd key or a fractional GPU count fails."""
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    typo = copy.deepcopy(cluster_config)
    typo["available_node_types"]["gpu"]["max_worker"] = 4
    with pytest.raises(jsonschema.ValidationError):
        validate_config(typo)
    fractional = copy.deepcopy(cluster_config)
    fractional["available_node_types"]["gpu"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(fractional)


def test_cluster_config_shape(cluster_config):
    c = cluster_config
    assert c["provider"]["type"] == "aws" and c["provider"]["region"]
    types = c["available_node_types"]
    head = types[c["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head must not host segbatch workers"
    assert "GPU" not in head["resources"]
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert set(gpu_types) >= {"gpu", "gpu_spot"}
    for name, t in gpu_types.items():
        assert t["min_workers"] == 0, f"{name} should scale from zero"
        assert "IamInstanceProfile" in t["node_config"], f"{name} needs an instance profile for S3"
    assert types["gpu"]["max_workers"] >= 1
    assert types["gpu_spot"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert "IamInstanceProfile" in head["node_config"]
    assert c["max_workers"] >= types["gpu"]["max_workers"]
    assert c["idle_timeout_minutes"] > 0
    docker = c["docker"]
    assert docker["image"] and docker["container_name"]
    assert "--gpus all" in docker["worker_run_options"]
    assert "--gpus all" not in " ".join(docker.get("run_options", []) + docker.get("head_run_options", []))


# -- infra/kuberay: RayCluster and RayJob -------------------------------------------


def _docs(name: str) -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]
    return {d["kind"]: d for d in docs}


def _check_cluster_spec(spec: dict) -> None:
    """What segbatch needs of the cluster (tests/test_kuberay.py checks the CRD's schema)."""
    assert spec.get("rayVersion") == RAY_IMAGE_VERSION
    assert spec.get("enableInTreeAutoscaling") is True
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams values are strings"
    assert head["rayStartParams"].get("num-cpus") == "0", "the head must not host segbatch workers"
    head_pod = head["template"]["spec"]
    images = set()
    for c in head_pod["containers"]:
        assert c["name"] and c["image"]
        images.add(c["image"])
        assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {})
    groups = spec["workerGroupSpecs"]
    assert groups
    names = [g["groupName"] for g in groups]
    assert len(names) == len(set(names))
    for g in groups:
        assert isinstance(g["minReplicas"], int) and isinstance(g["maxReplicas"], int)
        assert g["minReplicas"] == 0 <= g.get("replicas", 0) <= g["maxReplicas"]
        assert g["maxReplicas"] >= 1
        assert isinstance(g["rayStartParams"], dict)
        pod = g["template"]["spec"]
        assert pod.get("serviceAccountName") == head_pod.get("serviceAccountName")
        for c in pod["containers"]:
            assert c["name"] and c["image"]
            images.add(c["image"])
            limits = c["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) == 1
            # Kubernetes: for extended resources a request, if given, equals the limit.
            assert int(c["resources"].get("requests", limits)["nvidia.com/gpu"]) == 1
    assert len(images) == 1, f"head and workers should run the same image: {images}"


def _check_service_account(docs: dict[str, dict], pod_spec: dict) -> None:
    sa = docs["ServiceAccount"]
    assert sa["apiVersion"] == "v1"
    assert sa["metadata"]["name"] == pod_spec["serviceAccountName"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/.+", sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"])


def test_raycluster_manifest():
    docs = _docs("raycluster.yaml")
    rc = docs["RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1"
    assert rc["metadata"]["name"]
    _check_cluster_spec(rc["spec"])
    _check_service_account(docs, rc["spec"]["headGroupSpec"]["template"]["spec"])


def test_rayjob_manifest():
    docs = _docs("rayjob.yaml")
    job = docs["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    assert job["metadata"]["name"]
    spec = job["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 1  # a failed job is run again
    _check_cluster_spec(spec["rayClusterSpec"])
    _check_service_account(docs, spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"])
    # the same cluster as raycluster.yaml, so the two paths do not drift apart
    standalone = _docs("raycluster.yaml")["RayCluster"]["spec"]
    ours = spec["rayClusterSpec"]
    assert ours["headGroupSpec"] == standalone["headGroupSpec"]
    assert ours["workerGroupSpecs"] == standalone["workerGroupSpecs"]


def test_rayjob_entrypoint_is_a_valid_segbatch_run():
    spec = _docs("rayjob.yaml")["RayJob"]["spec"]
    args = shlex.split(spec["entrypoint"])
    assert args[:2] == ["segbatch", "run"]
    known = _run_options()
    for arg in args[2:]:
        if arg.startswith("--"):
            assert arg.split("=", 1)[0] in known, f"{arg}: not an option of segbatch run"
    cfg = _parse_run(args[2:])
    assert cfg.source.startswith("s3://") and cfg.dest.startswith("s3://")
    assert cfg.model.model == "coco"
    assert cfg.gpus_per_worker == 1
    # The cluster starts with no GPU pod: segbatch must ask for GPU workers itself.
    assert cfg.model.device == "cuda"
    max_gpus = sum(g["maxReplicas"] for g in spec["rayClusterSpec"]["workerGroupSpecs"])
    assert 1 <= cfg.workers <= max_gpus


def test_rayjob_sends_no_credentials_and_shows_where_they_go():
    """The entrypoint is stored in the job record: it passes `segbatch submit`'s
    check, and the manifest shows the Kubernetes secret to use instead."""
    from segbatch.engine import refuse_secrets

    spec = _docs("rayjob.yaml")["RayJob"]["spec"]
    refuse_secrets(shlex.split(spec["entrypoint"])[2:])
    for container in _containers(spec["rayClusterSpec"]):
        assert not any("SECRET" in str(e.get("value", "")) for e in container.get("env", [])), container["name"]
    text = (KUBERAY / "rayjob.yaml").read_text()
    assert "secretRef: {name: segbatch-s3}" in text and "AWS_SECRET_ACCESS_KEY" in text


def _containers(cluster_spec: dict) -> list[dict]:
    pods = [cluster_spec["headGroupSpec"]] + cluster_spec["workerGroupSpecs"]
    return [c for pod in pods for c in pod["template"]["spec"]["containers"]]


# -- infra/Dockerfile ----------------------------------------------------------------


def test_dockerfile_builds_a_gpu_image_of_the_project():
    text = (ROOT / "infra" / "Dockerfile").read_text()
    lines = [
        line.strip()
        for line in re.sub(r"\\\n", " ", text).splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    args = dict(re.match(r"ARG (\w+)=(\S+)", line).groups() for line in lines if re.match(r"ARG \w+=", line))
    froms = [line.split()[1] for line in lines if line.upper().startswith("FROM ")]
    assert len(froms) == 1
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], froms[0])
    assert base == f"rayproject/ray:{RAY_IMAGE_VERSION}-py311-gpu"
    runs = " ".join(line for line in lines if line.startswith("RUN "))
    # CUDA wheels of torch from PyTorch's index, at the versions the README pins
    assert re.search(
        r"--index-url \S*download\.pytorch\.org/whl/cu\d+",
        runs.replace('"${TORCH_INDEX_URL}"', args["TORCH_INDEX_URL"]),
    )
    assert args["TORCH_VERSION"] == "2.14.1" and args["TORCHVISION_VERSION"] == "0.29.1"
    # the project itself, from the build context (the repository root)
    assert re.search(r"pip install (\S+ )*\"?\.(\[[a-z,]+\])?\"?( |$)", runs)  # the project (with extras)
    copies = [line for line in lines if line.startswith("COPY ")]
    copied = {src for line in copies for src in line.split()[1:-1] if not src.startswith("--")}
    assert {"pyproject.toml", "README.md", "segbatch"} <= copied
    for src in copied:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"


# -- jobs/*.yaml -----------------------------------------------------------------------


def test_there_are_job_configs():
    assert {p.name for p in JOBS} >= {"retail-nightly.yaml", "satellite-archive.yaml", "local-demo.yaml"}


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_job_config_keys_and_values_are_run_options(path):
    data = read_config_file(str(path), cli.run)  # raises click.BadParameter on an unknown key
    assert data.get("source") and data.get("dest")
    by_name = {p.name: p for p in cli.run.params}
    ctx = cli.run.make_context("run", [])
    with ctx:
        for key, value in data.items():
            if key in ("source", "dest"):
                continue
            param = by_name[key]
            # the value is what the option would take on the command line
            assert param.type.convert(value, param, ctx) == value, f"{path.name}: {key}: {value!r}"
    cfg = _parse_run(["--config", str(path)])  # the JobConfig segbatch would run
    assert cfg.source == data["source"] and cfg.dest == data["dest"]


def test_cloud_job_configs_ask_for_gpu_workers():
    """On a cluster that scales from zero GPUs, `--workers 0` (automatic) would
    see no GPU at start: the cloud configs name their GPU workers."""
    for name in ("retail-nightly.yaml", "satellite-archive.yaml"):
        cfg = _parse_run(["--config", str(ROOT / "jobs" / name)])
        assert cfg.model.device == "cuda" and cfg.workers >= 1 and cfg.gpus_per_worker == 1, name
        assert cfg.source.startswith("s3://") and cfg.dest.startswith("s3://"), name


def test_satellite_archive_config():
    cfg = _parse_run(["--config", str(ROOT / "jobs" / "satellite-archive.yaml")])
    assert cfg.model.model in ("coco-v2", "coco") or "://" in cfg.model.model
    assert cfg.retries == 5
    assert cfg.shard_size >= 256


def test_retail_config_uses_a_checkpoint_with_classes():
    cfg = _parse_run(["--config", str(ROOT / "jobs" / "retail-nightly.yaml")])
    assert cfg.model.model.endswith(".pt") and cfg.model.classes
    assert "(?P<store>" in cfg.count_by  # the per-store, per-class table beside the detections


def test_orthomosaic_config_tiles_its_scenes():
    cfg = _parse_run(["--config", str(ROOT / "jobs" / "drone-orthomosaics.yaml")])
    assert (cfg.tile_size, cfg.tile_overlap, cfg.bands, cfg.scale) == (1024, 128, (1, 2, 3), (0.0, 4000.0))
    assert cfg.semantic_out.startswith("s3://") and cfg.model.device == "cuda"


def test_local_demo_config_runs_offline():
    cfg = _parse_run(["--config", str(ROOT / "jobs" / "local-demo.yaml")])
    assert cfg.model.model == "demo" and cfg.model.device == "cpu"
    assert "://" not in cfg.source and "://" not in cfg.dest and cfg.address is None


def test_command_line_overrides_a_job_config():
    cfg = _parse_run(
        [
            "--config",
            str(ROOT / "jobs" / "retail-nightly.yaml"),
            "s3://b/in/2026-11-22/",
            "s3://b/out/2026-11-22/",
            "--shard-size",
            "7",
        ]
    )
    assert (cfg.source, cfg.dest, cfg.shard_size) == ("s3://b/in/2026-11-22/", "s3://b/out/2026-11-22/", 7)


def test_mistyped_job_config_key_is_refused_with_a_hint(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("source: a\ndest: b\nscore_treshold: 0.3\nshard-size: 8\n")
    with pytest.raises(click.BadParameter, match=r"score_treshold \(did you mean score_threshold\?\)"):
        read_config_file(str(path), cli.run)
