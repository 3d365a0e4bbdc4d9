"""Credentials never leave: redaction of every form a secret takes (redact.py),
`segbatch submit` refusing to send one, and a whole job whose SOURCE URL and
storage options carry secrets leaving none in DEST, its logs or Ray's.

Real parts: the CLI in a subprocess, a local Ray it starts, an HTTP server
that demands the SOURCE URL's password (so the secret is really used).
"""

from __future__ import annotations

import base64
import functools
import glob
import json
import os
import socket
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from runutil import FAST_ARGS, _png, _run_cli, ray_tmp  # noqa: F401  (ray_tmp: a fixture)

from segbatch.cli import main
from segbatch.engine import JobStore, SecretInSubmission, entrypoint, refuse_secrets, runtime_env
from segbatch.redact import find_secrets, redact, secret_values
from segbatch.schema import file_metadata
from segbatch.storage import Storage

# Distinctive values, so a leak cannot hide behind a common word.
ACCOUNT_KEY = "QWNjb3VudEtleVNFR0JBVENIc2VjcmV0MDEyMzQ1Njc4OQ=="
CONNECTION_STRING = (
    f"DefaultEndpointsProtocol=https;AccountName=segbatchacct;AccountKey={ACCOUNT_KEY};EndpointSuffix=core.windows.net"
)
BEARER = "eyJhbGciOiJSUzI1NiJ9.SEGBATCHbearerTOKEN.c2lnbmF0dXJl"
PASSWORD = "Pa55w0rd-SEGBATCH-url"
SIGNATURE = "5eGbA7cH0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9"


# -- redact.py: each form ------------------------------------------------------------


@pytest.mark.parametrize(
    "text, secret, kept",
    [
        (f"http://seguser:{PASSWORD}@host:8080/in/m.txt", PASSWORD, "http://seguser:***@host:8080/in/m.txt"),
        (
            "https://b.s3.amazonaws.com/k.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLE%2F20260101"
            f"&X-Amz-Signature={SIGNATURE}&X-Amz-Security-Token=FQoGZXIvYXdzEXAMPLE&x-id=GetObject",
            SIGNATURE,
            "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***&X-Amz-Signature=***"
            "&X-Amz-Security-Token=***&x-id=GetObject",
        ),
        (
            f"https://storage.googleapis.com/b/o.png?X-Goog-Signature={SIGNATURE}&X-Goog-Date=1",
            SIGNATURE,
            "X-Goog-Date=1",
        ),
        (
            f"https://a.blob.core.windows.net/c/x.png?sv=2022-11-02&se=2026-01-01&sp=r&sig={SIGNATURE}%3D",
            SIGNATURE,
            "https://a.blob.core.windows.net/c/x.png?sv=***&se=***&sp=***&sig=***",
        ),
        (f"https://api.example.com/m.pt?token={SIGNATURE}&page=2", SIGNATURE, "token=***&page=2"),
        (f"cannot open: {CONNECTION_STRING}", ACCOUNT_KEY, "AccountName=segbatchacct;AccountKey=***;EndpointSuffix"),
        (
            f"BlobEndpoint=https://a;SharedAccessSignature=sv=2020&sig={SIGNATURE};X=1",
            SIGNATURE,
            "SharedAccessSignature=***;X=1",
        ),
        (f"headers: {{'Authorization': 'Bearer {BEARER}', 'Accept': '*/*'}}", BEARER, "'Authorization': 'Bearer ***'"),
        (f"Authorization: AWS4-HMAC-SHA256 Credential=AKIAX/2026, Signature={SIGNATURE}", SIGNATURE, "Signature=***"),
    ],
)
def test_redact_masks_credentials_by_their_form(text, secret, kept):
    clean = redact(text)
    assert secret not in clean
    assert kept in clean


@pytest.mark.parametrize(
    "text",
    [
        "abfs://container@account.dfs.core.windows.net/images/a.png",  # the user info is the container
        "s3://bucket/photos/logo@2x.png",
        "http://127.0.0.1:9000/bucket/key.jpg",
        "/data/shelf 12/img.jpg",
    ],
)
def test_redact_keeps_what_is_no_secret(text):
    assert redact(text) == text


def test_secret_values_of_options_cover_keys_headers_connection_strings_and_urls():
    options = {
        "az": {"connection_string": CONNECTION_STRING},
        "https": {"client_kwargs": {"headers": {"Authorization": f"Bearer {BEARER}", "X-Trace": "trace-id-1"}}},
        "s3": {
            "key": "AKIASEGBATCH0001",
            "secret": "s3cr3t/SEGBATCH",
            "endpoint_url": f"http://u:{PASSWORD}@h:9000",
            "profile": "prod",
            "anon": False,
            "region_name": "eu-west-1",
            "s3_additional_kwargs": {"SSEKMSKeyId": "arn:k"},
        },
        "gcs": {"token": "google_default"},
    }
    values = secret_values(options)
    for secret in (
        CONNECTION_STRING,
        ACCOUNT_KEY,
        BEARER,
        "trace-id-1",
        "AKIASEGBATCH0001",
        "s3cr3t/SEGBATCH",
        PASSWORD,
    ):
        assert secret in values, secret
    for plain in ("prod", "eu-west-1", "arn:k", "google_default"):
        assert plain not in values, plain
    assert find_secrets(options) == [
        "az.connection_string",
        "az.connection_string.AccountKey",
        "https.client_kwargs.headers.Authorization",
        "https.client_kwargs.headers.X-Trace",
        "s3.endpoint_url",
        "s3.key",
        "s3.secret",
    ]
    # Storage masks them in everything it says, a bearer token alone included
    st = Storage(options)
    said = st.redact(f"{CONNECTION_STRING} / {ACCOUNT_KEY} / token {BEARER} / s3cr3t/SEGBATCH")
    assert all(s not in said for s in (ACCOUNT_KEY, BEARER, "s3cr3t/SEGBATCH")), said


def test_config_json_and_parquet_metadata_are_redacted(tmp_path):
    """JobStore's records and the Parquet metadata: URLs given as SOURCE,
    DEST or --model keep no credential."""
    store = JobStore(str(tmp_path / "dest"), Storage())
    model = f"https://m.s3.amazonaws.com/w.pt?X-Amz-Credential=AKIAX&X-Amz-Signature={SIGNATURE}"
    store.write_config(
        {"job": {"source": f"http://u:{PASSWORD}@h/m.txt", "model": {"model": model}}, "result_key": "k"}
    )
    text = (tmp_path / "dest" / "_segbatch" / "config.json").read_text()
    assert PASSWORD not in text and SIGNATURE not in text
    assert json.loads(text)["job"]["source"] == "http://u:***@h/m.txt"
    meta = file_metadata(model_id=model, weights_hash="h", result_key="k", thresholds={}, classes=[], version="0")
    assert SIGNATURE not in json.dumps(meta) and meta["model_id"].startswith("https://m.s3.amazonaws.com/w.pt?")


# -- segbatch submit sends no secret --------------------------------------------------


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP port where a Jobs API would be: the test checks nobody connected."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    yield sock
    sock.close()


def _connected(sock: socket.socket) -> bool:
    try:
        sock.accept()[0].close()
    except BlockingIOError:
        return False
    return True


@pytest.mark.parametrize(
    "args, named",
    [
        (
            ["--storage-options", json.dumps({"key": "AKIASEGBATCH0001", "secret": "s3cr3t/SEGBATCH"})],
            "--storage-options key",
        ),
        ([f"--storage-options={json.dumps({'az': {'connection_string': CONNECTION_STRING}})}"], "az.connection_string"),
        (
            ["--storage-options", json.dumps({"client_kwargs": {"headers": {"Authorization": f"Bearer {BEARER}"}}})],
            "Authorization",
        ),
        (["--model", f"https://m.s3.amazonaws.com/w.pt?X-Amz-Signature={SIGNATURE}"], "--model"),
    ],
)
def test_submit_refuses_literal_secrets_before_connecting(tmp_path, listener, args, named):
    address = f"http://127.0.0.1:{listener.getsockname()[1]}"
    result = CliRunner().invoke(main, ["submit", "--address", address, str(tmp_path / "in"), "s3://b/out/", *args])
    assert result.exit_code == 2, result.output
    assert not _connected(listener), "submit reached the Jobs API with a secret in hand"
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("segbatch: error: "), result.output
    assert "Traceback" not in result.output and named in lines[0]
    for fix in (
        '{"profile": "prod"}',
        "environment variables",
        "IRSA",
        "Kubernetes secret",
        "infra/kuberay/rayjob.yaml",
    ):
        assert fix in lines[0], fix
    for secret in ("AKIASEGBATCH0001", "s3cr3t/SEGBATCH", ACCOUNT_KEY, BEARER, SIGNATURE):
        assert secret not in result.output


def test_submit_source_url_with_a_password_is_refused(tmp_path, listener):
    address = f"http://127.0.0.1:{listener.getsockname()[1]}"
    result = CliRunner().invoke(main, ["submit", "--address", address, f"https://u:{PASSWORD}@h/m.txt", "s3://b/out/"])
    assert result.exit_code == 2 and "SOURCE" in result.output and PASSWORD not in result.output
    assert not _connected(listener)


def test_submit_with_a_profile_builds_an_entrypoint_and_runtime_env_without_secrets():
    args = [
        "s3://b/in/",
        "s3://b/out/",
        "--storage-options",
        json.dumps(
            {
                "s3": {
                    "profile": "prod",
                    "endpoint_url": "http://h:9000",
                    "anon": False,
                    "client_kwargs": {"region_name": "eu-west-1"},
                }
            }
        ),
        "--workers",
        "2",
    ]
    refuse_secrets(args, ["pandas==2.2"], "nightly-1")  # allowed: nothing secret
    command = entrypoint(args)
    assert command.startswith("python -m segbatch.cli run s3://b/in/ s3://b/out/ --storage-options ")
    assert '"profile": "prod"' in command
    env = runtime_env(["pandas==2.2"])
    assert set(env) == {"py_modules", "pip"} and "env_vars" not in env
    assert runtime_env(env_vars={"SEGBATCH_LOG": "info"})["env_vars"] == {"SEGBATCH_LOG": "info"}
    with pytest.raises(SecretInSubmission, match="AWS_SECRET_ACCESS_KEY") as refused:
        runtime_env(env_vars={"AWS_SECRET_ACCESS_KEY": "s3cr3t/SEGBATCH"})
    assert "s3cr3t" not in str(refused.value)
    with pytest.raises(SecretInSubmission, match="--pip"):
        refuse_secrets(args, [f"git+https://bot:{PASSWORD}@github.com/o/r.git"])


# -- a whole job: no secret anywhere under DEST, in its logs or in Ray's ----------------------


@pytest.fixture
def protected_http(tmp_path) -> Iterator[tuple[str, Path]]:
    """An HTTP server over a folder that answers only with the right Basic auth."""
    root = tmp_path / "served"
    root.mkdir()
    want = "Basic " + base64.b64encode(f"seguser:{PASSWORD}".encode()).decode()

    class Handler(SimpleHTTPRequestHandler):
        def _allowed(self) -> bool:
            if self.headers.get("Authorization") == want:
                return True
            self.send_response(401)
            self.end_headers()
            return False

        def do_GET(self):
            if self._allowed():
                super().do_GET()

        def do_HEAD(self):
            if self._allowed():
                super().do_HEAD()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://seguser:{PASSWORD}@127.0.0.1:{server.server_port}", root
    server.shutdown()


def test_a_job_leaves_no_secret_under_dest_in_its_logs_or_in_rays(tmp_path, ray_tmp, protected_http):  # noqa: F811
    base, served = protected_http
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"img{i}.png").write_bytes(_png(i))
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # an error row: its message is checked too
    (served / "manifest.txt").write_text("\n".join(str(p) for p in sorted(images.iterdir())) + "\n")
    options = {
        "http": {},  # the SOURCE's own password does the HTTP auth
        "az": {"connection_string": CONNECTION_STRING},
        "gcs": {"headers": {"Authorization": f"Bearer {BEARER}"}},
    }
    dest = tmp_path / "out"
    proc = _run_cli(
        [
            "-vv",
            "run",
            f"{base}/manifest.txt",
            str(dest),
            *FAST_ARGS,
            "--shard-size",
            "2",
            "--workers",
            "1",
            "--cpus-per-worker",
            "1",
            "--storage-options",
            json.dumps(options),
        ],
        ray_tmp,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "4 rows (1 with errors" in proc.stderr

    secrets = [PASSWORD, CONNECTION_STRING, ACCOUNT_KEY, BEARER]
    for text, where in ((proc.stderr, "stderr"), (proc.stdout, "stdout")):
        assert not [s for s in secrets if s in text], f"a credential in the job's {where}"
    assert "seguser:***@127.0.0.1" in proc.stderr  # the SOURCE was logged, masked
    files = [p for p in dest.rglob("*") if p.is_file()]
    assert any(p.name == "config.json" for p in files) and any(p.suffix == ".parquet" for p in files)
    for path in files:
        body = path.read_bytes()
        assert not [s for s in secrets if s.encode() in body], f"a credential in {path}"
        if path.suffix == ".parquet":  # the metadata, decoded, and every row
            meta = json.dumps({k.decode(): v.decode() for k, v in (pq.read_schema(path).metadata or {}).items()})
            rows = json.dumps(pq.read_table(path).to_pylist(), default=str)
            assert not [s for s in secrets if s in meta or s in rows], f"a credential in {path}"
    config = json.loads((dest / "_segbatch" / "config.json").read_text())
    assert config["job"]["source"].startswith("http://seguser:***@127.0.0.1:")
    ray_logs = [p for p in glob.glob(f"{ray_tmp}/**/*", recursive=True) if os.path.isfile(p) and "/logs/" in p]
    assert ray_logs, f"no Ray logs under {ray_tmp}"
    for path in ray_logs:
        with open(path, "rb") as f:
            body = f.read()
        assert not [s for s in secrets if s.encode() in body], f"a credential in Ray's log {path}"
