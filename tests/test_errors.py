"""Errors a user can cause are one line naming the cause and the fix, with
exit status 2, never a traceback; a bug keeps its traceback.

Each case runs the real command line in a subprocess against real parts: a
moto S3 server (a missing bucket, a fault proxy that denies access), a port
where nothing listens, real files (a bad manifest, a corrupt checkpoint, a
class list of the wrong length), torchvision's download with no way out.
All fail before any Ray worker starts, so each takes seconds.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from click.testing import CliRunner
from runutil import _png

from segbatch import cli

from faultproxy import FaultProxy

SEGBATCH = [sys.executable, "-m", "segbatch.cli"]
QUICK = ["--model", "random", "--min-size", "64", "--max-size", "96", "--progress", "none"]


def _segbatch(args: list[str], timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    environ = dict(os.environ, PYTHONUNBUFFERED="1", **env)
    environ.pop("RAY_ADDRESS", None)
    return subprocess.run([*SEGBATCH, *args], env=environ, capture_output=True, text=True, timeout=timeout)


def _error_line(proc: subprocess.CompletedProcess, exit_code: int = 2) -> str:
    """The one ``segbatch: error:`` line of a failed run (and no traceback)."""
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert proc.returncode == exit_code, proc.stderr[-4000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("segbatch: error:")]
    assert len(lines) == 1, proc.stderr[-4000:]
    return lines[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- storage ------------------------------------------------------------------------


def test_a_dest_bucket_that_does_not_exist(s3, tmp_path):
    s3.put("in/a.png", _png(0))
    options = json.dumps(s3.storage_options)
    proc = _segbatch(["run", s3.url("in/"), "s3://segbatch-no-such-bucket/out/", *QUICK, "--storage-options", options])
    line = _error_line(proc)
    assert "segbatch-no-such-bucket" in line
    assert "create" in line.lower() or "bucket" in line.lower()


def test_an_endpoint_where_nothing_listens(s3, tmp_path):
    endpoint = f"http://127.0.0.1:{_free_port()}"
    # botocore's own retries off: segbatch's (with backoff) are the ones under test
    options = json.dumps(
        {**s3.storage_options, "endpoint_url": endpoint, "config_kwargs": {"retries": {"max_attempts": 1}}}
    )
    proc = _segbatch(["run", s3.url("in/"), str(tmp_path / "out"), *QUICK, "--storage-options", options])
    line = _error_line(proc)
    assert endpoint.split("//")[1] in line, line  # names the endpoint
    assert "endpoint" in line.lower()


def test_access_denied_to_the_source(s3, s3_server, tmp_path):
    s3.put("in/a.png", _png(0))
    with FaultProxy(s3_server, rate=0.0) as proxy:
        proxy.deny(f"/{s3.bucket}/", code="AccessDenied")
        options = json.dumps(s3.options_via(proxy.endpoint))
        proc = _segbatch(["run", s3.url("in/"), str(tmp_path / "out"), *QUICK, "--storage-options", options])
    line = _error_line(proc)
    assert s3.bucket in line and ("denied" in line.lower() or "credentials" in line.lower()), line


# -- inputs -------------------------------------------------------------------------


def test_a_manifest_without_a_uri_column(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n/data/a.png,1\n")
    line = _error_line(_segbatch(["run", str(manifest), str(tmp_path / "out"), *QUICK]))
    assert "m.csv" in line and "'uri' column" in line and "'path'" in line


def test_a_corrupt_checkpoint(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(_png(0))
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"PK\x03\x04 this is not a checkpoint" * 10)
    line = _error_line(_segbatch(["run", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(bad)]))
    assert "model.pt" in line


def test_a_classes_file_of_the_wrong_length(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(_png(0))
    classes = tmp_path / "classes.txt"
    classes.write_text("__background__\nbottle\n" + "".join(f"c{i}\n" for i in range(40)))
    line = _error_line(
        _segbatch(["run", str(tmp_path / "in"), str(tmp_path / "out"), "--model", "demo", "--classes", str(classes)])
    )
    assert "classes.txt names 42" in line and "--classes" in line


def test_coco_weights_with_no_internet(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(_png(0))
    closed = f"http://127.0.0.1:{_free_port()}"  # every download goes through a proxy that is not there
    proc = _segbatch(
        ["run", str(tmp_path / "in"), str(tmp_path / "out"), "--model", "coco"],
        TORCH_HOME=str(tmp_path / "torch"),
        HTTPS_PROXY=closed,
        https_proxy=closed,
        HTTP_PROXY=closed,
        http_proxy=closed,
    )
    line = _error_line(proc)
    assert "coco" in line.lower() or "weights" in line.lower(), line


# -- the handler itself ----------------------------------------------------------------


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """Anything but a SegbatchError is a bug: the handler lets it through, traceback and all."""
    import segbatch.outputs

    data = tmp_path / "gt.json"
    data.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))

    def bug(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(segbatch.outputs, "evaluate", bug)  # the commands import outputs' public names
    monkeypatch.setattr(segbatch.outputs, "read_rows", lambda *a, **k: [])
    result = CliRunner().invoke(cli.main, ["eval", str(tmp_path / "nothing"), str(data)])
    assert isinstance(result.exception, KeyError)  # not swallowed: the runner holds the traceback


@pytest.mark.parametrize("exit_code", [1, 2])
def test_the_error_line_is_one_line_with_the_errors_exit_status(exit_code):
    from segbatch.errors import SegbatchError, UsageError

    kind = UsageError if exit_code == 2 else SegbatchError

    @cli.main.command("boom", hidden=True)
    def boom() -> None:
        raise kind("first line\n  second line with http://u:Pa55w0rd-SEGBATCH@h/x")

    try:
        result = CliRunner().invoke(cli.main, ["boom"])
    finally:
        cli.main.commands.pop("boom")
    assert result.exit_code == exit_code
    assert result.output == "segbatch: error: first line second line with http://u:***@h/x\n"
