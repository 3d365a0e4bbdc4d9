"""Sending a job to a running Ray cluster through Ray's Jobs API.

The entrypoint is the same ``segbatch run`` a user types locally; the
runtime environment carries this installation's ``segbatch`` package, so
the cluster needs only Ray, torch and the other dependencies (the project's
container image has them all).
"""

from __future__ import annotations

import asyncio
import os
import shlex
from pathlib import Path
from typing import Callable

from ray.job_submission import JobStatus, JobSubmissionClient

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}


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
    """This installation's package, shipped to every process of the job."""
    env: dict = {"py_modules": [str(Path(__file__).resolve().parent)]}
    if extra_pip:
        env["pip"] = list(extra_pip)
    if env_vars:
        env["env_vars"] = dict(env_vars)
    return env


def submit(address: str | None, run_args: list[str], *, submission_id: str | None = None, env: dict | None = None) -> tuple[JobSubmissionClient, str]:
    """Submit ``segbatch run RUN_ARGS``; returns the client and the submission id."""
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
