"""Sending a job to a running Ray cluster through Ray's Jobs API.

The entrypoint is the same ``segbatch run`` a user types locally; the
runtime environment carries this installation's ``segbatch`` package, so
the cluster needs only Ray, torch and the other dependencies (the project's
container image has them all).

No credential is ever sent: Ray stores a job's entrypoint, metadata and
runtime environment in its job record (``ray job list``, the dashboard) and
prints the entrypoint as the first line of the job's log. ``refuse_secrets``
refuses a submission carrying one, before any connection, and names what the
cluster should use instead.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
from collections.abc import Callable
from pathlib import Path

from ray.job_submission import JobStatus, JobSubmissionClient

from segbatch.errors import UsageError
from segbatch.redact import SECRET_KEY, find_secrets, has_secret

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
CREDENTIALS_ON_THE_CLUSTER = (
    'Give the cluster its own credentials instead: a named profile (--storage-options \'{"profile": "prod"}\', '
    "with that profile in the nodes' ~/.aws), environment variables or an instance role / IRSA service account "
    "on the cluster's nodes, or a Kubernetes secret mounted as environment variables of the Ray pods "
    "(see infra/kuberay/rayjob.yaml); non-secret options (endpoint_url, region_name, profile, anon) may stay."
)


class SecretInSubmission(UsageError):
    """A submission would carry a credential into the cluster's job record."""


def refuse_secrets(run_args: list[str], extra_pip: list[str] | None = None, submission_id: str | None = None) -> None:
    """Raise ``SecretInSubmission`` if anything ``submit`` would send holds a
    literal credential: a secret storage option (``key``, ``secret``,
    ``token``, a ``connection_string``, a header), a URL with a password or a
    presigned query, anywhere in RUN_ARGS, the pip packages or the job's name.
    The message names where, never the value."""
    found = []
    for i, arg in enumerate(run_args):
        name = _option_of(run_args, i)
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
        options = _json_object(value)
        if options is not None:
            found += [f"{name} {path}" for path in find_secrets(options)]
        elif has_secret(value):
            found.append(f"{name} (a URL or text with a credential)")
    found += [f"--pip {p} (a URL with a credential)" for p in extra_pip or () if has_secret(p)]
    if submission_id and has_secret(submission_id):
        found.append("--submission-id")
    if found:
        raise SecretInSubmission(
            f"segbatch submit sends no credentials, and these are: {'; '.join(dict.fromkeys(found))}. "
            "Ray keeps a job's command line in its job record (ray job list, the dashboard) and prints it "
            f"in the job's log. {CREDENTIALS_ON_THE_CLUSTER}"
        )


def _option_of(args: list[str], i: int) -> str:
    """The option ``args[i]`` is the value of (``--storage-options``), or
    which positional argument it is."""
    arg = args[i]
    if arg.startswith("--"):
        return arg.split("=", 1)[0]
    if i > 0 and args[i - 1].startswith("--") and "=" not in args[i - 1]:
        return args[i - 1]
    positional = sum(
        1 for j, a in enumerate(args[:i]) if not a.startswith("-") and not (j and args[j - 1].startswith("--"))
    )
    return ("SOURCE", "DEST")[positional] if positional < 2 else f"argument {i + 1}"


def _json_object(text: str) -> dict | None:
    if not text.lstrip().startswith("{"):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def dashboard_address(address: str | None) -> str:
    """The Jobs API address: --address, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS, else local."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_DASHBOARD
    if "://" not in address:
        address = f"http://{address}"
    return address


def entrypoint(run_args: list[str]) -> str:
    """The job's command: ``python -m segbatch.cli run ARGS`` (the package
    comes in the runtime environment, so no installed script is assumed)."""
    return "python -m segbatch.cli run " + " ".join(shlex.quote(a) for a in run_args)


def runtime_env(extra_pip: list[str] | None = None, env_vars: dict[str, str] | None = None) -> dict:
    """This installation's package, shipped to every process of the job.

    ``env_vars`` are stored in the job record as they are: a secret-looking
    name (``AWS_SECRET_ACCESS_KEY``) or value is refused.
    """
    env: dict = {"py_modules": [str(Path(__file__).resolve().parent)]}
    if extra_pip:
        env["pip"] = list(extra_pip)
    if env_vars:
        secret = sorted(k for k, v in env_vars.items() if SECRET_KEY.search(k) or has_secret(str(v)))
        if secret:
            raise SecretInSubmission(
                f"the job's runtime environment would carry credentials ({', '.join(secret)}), and Ray keeps it "
                f"in the job record. {CREDENTIALS_ON_THE_CLUSTER}"
            )
        env["env_vars"] = dict(env_vars)
    return env


def submit(
    address: str | None, run_args: list[str], *, submission_id: str | None = None, env: dict | None = None
) -> tuple[JobSubmissionClient, str]:
    """Submit ``segbatch run RUN_ARGS``; returns the client and the submission id.
    Refuses (``SecretInSubmission``) to send a credential, before connecting."""
    refuse_secrets(run_args, (env or {}).get("pip"), submission_id)
    client = JobSubmissionClient(dashboard_address(address))
    job_id = client.submit_job(
        entrypoint=entrypoint(run_args),
        runtime_env=env if env is not None else runtime_env(),
        submission_id=submission_id,
        metadata={"tool": "segbatch"},
    )
    return client, job_id


def follow(client: JobSubmissionClient, job_id: str, on_line: Callable[[str], None]) -> JobStatus:
    """Stream a job's logs until it ends; returns its final status."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            for line in chunk.splitlines():
                on_line(line)

    asyncio.run(tail())
    return client.get_job_status(job_id)


def job_info(address: str | None, job_id: str) -> tuple[JobStatus, str | None, str]:
    """(status, message, logs) of a submitted job."""
    client = JobSubmissionClient(dashboard_address(address))
    info = client.get_job_info(job_id)
    return info.status, info.message, client.get_job_logs(job_id)
