"""Helpers shared by the benchmarks: the machine, peak memory, a local S3, test images.

Nothing here is timed; it only sets the stage and describes it.
"""

from __future__ import annotations

import datetime as _dt
import io
import os
import platform
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/x.py` from a checkout imports segbatch from it
    sys.path.insert(0, str(ROOT))

S3_CREDENTIALS = {"key": "bench", "secret": "bench"}
S3_REGION = "us-east-1"


# -- the machine -----------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_text() -> str:
    """One line: CPU model, cores this process may use, torch version, date (UTC)."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{cpu_model()}, {cores} cores available ({os.cpu_count()} online); torch {torch.__version__}, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}; {now}"
    )


# -- memory ------------------------------------------------------------------------


def status_kib(pid: int | str, field: str = "VmHWM") -> int | None:
    """A ``/proc/PID/status`` field in KiB (VmHWM: peak resident set), or None if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid`` (a child started with ``start_new_session``: its Ray too)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def run_measured_child(cmd: list[str], timeout: float, what: str) -> dict[str, Any]:
    """Run ``cmd`` (a benchmark's own child) in a session of its own with a private
    Ray temp dir; returns the JSON of its last ``RESULT `` line, or exits naming ``what`` failed.

    Whatever of its session outlives it (its local Ray) is killed, and nothing else.
    """
    import json
    import shutil
    import signal
    import subprocess
    import tempfile
    import time

    ray_tmp = tempfile.mkdtemp(prefix="sbb", dir="/tmp")  # Ray's socket paths must stay short
    env = dict(os.environ, RAY_TMPDIR=ray_tmp)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    finally:
        deadline = time.monotonic() + 20
        while session_pids(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in session_pids(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{what} failed (exit {proc.returncode}):\n{err[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def mib(kib: int | float | None) -> str:
    return "-" if not kib else f"{kib / 1024:.0f}"


# -- a local S3 (moto's server over HTTP) ----------------------------------------------


def start_moto():
    """moto's S3 on a free port of 127.0.0.1; returns (server, endpoint URL)."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def aws_env() -> dict[str, str]:
    """Environment that keeps every client (boto, s3fs, pyarrow) on the bench's credentials."""
    return {
        "AWS_ACCESS_KEY_ID": S3_CREDENTIALS["key"],
        "AWS_SECRET_ACCESS_KEY": S3_CREDENTIALS["secret"],
        "AWS_DEFAULT_REGION": S3_REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


def storage_options(endpoint: str) -> dict[str, Any]:
    """fsspec/s3fs options that reach the bench's moto server."""
    return {"endpoint_url": endpoint, **S3_CREDENTIALS}


def boto_client(endpoint: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=S3_CREDENTIALS["key"],
        aws_secret_access_key=S3_CREDENTIALS["secret"],
        region_name=S3_REGION,
    )


def pyarrow_s3(endpoint: str):
    """pyarrow's own S3 filesystem on the moto endpoint (what Ray Data reads with)."""
    from urllib.parse import urlparse

    from pyarrow import fs

    u = urlparse(endpoint)
    return fs.S3FileSystem(
        access_key=S3_CREDENTIALS["key"],
        secret_key=S3_CREDENTIALS["secret"],
        region=S3_REGION,
        endpoint_override=u.netloc,
        scheme=u.scheme,
    )


# -- images --------------------------------------------------------------------------

_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina", "cat")


def photo_jpeg(index: int, width: int, height: int, quality: int = 90) -> bytes:
    """A ``width`` x ``height`` JPEG of real photographs (skimage.data, bundled, offline).

    Image ``index`` tiles two photos side by side (which two, and their
    order and flips, vary with ``index``), resizes the tile to cover the
    target size and crops its centre: natural image statistics, so JPEG
    sizes and decode times are those of photos, and no two images are equal.
    """
    import numpy as np
    import skimage.data
    from PIL import Image

    def photo(name: str) -> Image.Image:
        arr = getattr(skimage.data, name)()
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        return Image.fromarray(arr[..., :3])

    a = photo(_PHOTOS[index % len(_PHOTOS)])
    b = photo(_PHOTOS[(index * 3 + 1) % len(_PHOTOS)])
    if (index // len(_PHOTOS)) % 2:
        a = a.transpose(Image.FLIP_LEFT_RIGHT)
    th = max(a.height, b.height)
    a = a.resize((round(a.width * th / a.height), th), Image.BICUBIC)
    b = b.resize((round(b.width * th / b.height), th), Image.BICUBIC)
    tile = Image.new("RGB", (a.width + b.width, th))
    tile.paste(a, (0, 0))
    tile.paste(b, (a.width, 0))
    scale = max(width / tile.width, height / tile.height)
    tile = tile.resize((max(width, round(tile.width * scale)), max(height, round(tile.height * scale))), Image.BICUBIC)
    left, top = (tile.width - width) // 2, (tile.height - height) // 2
    img = tile.crop((left, top, left + width, top + height))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def parse_size(text: str) -> tuple[int, int]:
    """``1920x1080`` to (width, height)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size must be WIDTHxHEIGHT, e.g. 1920x1080, not {text!r}") from None
    if w < 16 or h < 16:
        raise ValueError("--size must be at least 16x16")
    return w, h
