"""Fixtures of the engine's tests: ``ray_tmp`` (a private RAY_TMPDIR for a CLI run, ``runutil.py``)."""

from runutil import ray_tmp  # noqa: F401 (a fixture, for the tests of this folder)
