"""A poison image: valid to every decoder, fatal to the Ray worker process that decodes it.

Real archives hold images that kill the process decoding them (a decoder
crash in native code, the kernel's OOM killer on one huge image); no Python
exception is ever raised. To reproduce that with a small, valid image:

- ``poisoned_png(seed)`` is a PNG with ``POISON_MARK`` after its IEND chunk
  (Pillow ignores bytes after IEND, so it decodes normally anywhere else);
- ``install()``, a Ray ``worker_process_setup_hook``, wraps the decoder the
  pipeline calls (``segbatch.engine.pipeline.decode_image``, and ``segbatch.model.decode``'s
  own name) so that a worker process SIGKILLs itself when the bytes it is
  asked to decode contain ``POISON_MARK``;
- ``runtime_env()`` is the runtime env that runs the hook in every worker of
  a Ray session (``ray.init(runtime_env=poison.runtime_env())``), with tests/
  on the workers' PYTHONPATH.

segbatch's job calls ``ray.init`` only when Ray is not initialized, so a test
starts Ray itself with this runtime env, then calls ``run_job``. Only the
workers carry the hook: the driver (the test process) never decodes.
"""

from __future__ import annotations

import functools
import io
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

POISON_MARK = b"SEGBATCH-POISON"
TESTS_DIR = str(Path(__file__).resolve().parent)
HOOK = "poison.install"


def poisoned_png(seed: int = 0, size: tuple[int, int] = (64, 80)) -> bytes:
    """A valid PNG (random pixels) that kills the worker that decodes it, once ``install`` ran there."""
    return png(seed, size) + POISON_MARK


def png(seed: int = 0, size: tuple[int, int] = (64, 80)) -> bytes:
    """A small PNG of seeded random pixels, ``size`` = (height, width)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def two_shards_one_poisoned(folder: Path) -> None:
    """Four PNGs in ``folder``, two shards of two: ``a1.png`` kills its worker every
    time, its neighbour ``a0.png`` and the other shard's ``b0``/``b1`` are healthy."""
    folder.mkdir()
    (folder / "a0.png").write_bytes(png(0))
    (folder / "a1.png").write_bytes(poisoned_png(1))
    (folder / "b0.png").write_bytes(png(2))
    (folder / "b1.png").write_bytes(png(3))


def runtime_env(env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    """A Ray runtime env whose workers run ``install`` at start, with tests/ importable."""
    path = os.pathsep.join(p for p in (TESTS_DIR, os.environ.get("PYTHONPATH", "")) if p)
    return {"worker_process_setup_hook": HOOK, "env_vars": {"PYTHONPATH": path, **(env_vars or {})}}


def _killing(decode: Callable[..., Any]) -> Callable[..., Any]:
    if getattr(decode, "_poison_wrapped", False):
        return decode

    @functools.wraps(decode)
    def wrapper(data: Any, *args: Any, **kwargs: Any) -> Any:
        if POISON_MARK in bytes(data):
            sys.stderr.write(f"poison: SIGKILL of worker pid {os.getpid()}\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no exception: as a segfault or the OOM killer
        return decode(data, *args, **kwargs)

    wrapper._poison_wrapped = True  # type: ignore[attr-defined]
    return wrapper


def install() -> None:
    """Ray's worker_process_setup_hook: make this worker die on a poison image.

    Patches the name the pipeline looks up at call time (it imported
    ``decode_image`` from ``segbatch.model.decode``) and the original, so a caller
    that goes through either is caught."""
    from segbatch.engine import pipeline
    from segbatch.model import decode

    decode.decode_image = _killing(decode.decode_image)
    pipeline.decode_image = _killing(pipeline.decode_image)
