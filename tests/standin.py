"""Stand-in commands on PATH for the tests that run the nightly job's shell lines
(``tests/test_airflow_dag.py``, ``tests/test_kuberay.py``): ``segbatch`` records each call,
and whether it ran inside a Ray job (``FAKE_IN_RAY_JOB``, set by a stand-in ``ray``), and exits
as the test says for each command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SEGBATCH = """#!{python}
# A stand-in for segbatch: records its arguments (and whether it ran inside the Ray job),
# exits with $FAKE_SEGBATCH_EXIT_<COMMAND>.
import json, os, sys
with open(os.environ["FAKE_SEGBATCH_CALLS"], "a") as f:
    f.write(json.dumps([sys.argv[1:], os.environ.get("FAKE_IN_RAY_JOB") == "1"]) + "\\n")
sys.exit(int(os.environ.get("FAKE_SEGBATCH_EXIT_" + sys.argv[1].upper(), "0")))
"""


def run_line(
    tmp_path: Path,
    line: str,
    shell: str = "/bin/sh",
    others: dict[str, str] | None = None,
    run_exit: int = 0,
    publish_exit: int = 0,
) -> tuple[int, list[tuple[list[str], bool]]]:
    """Run ``line`` with ``shell -c``, a stand-in ``segbatch`` (and ``others``: name -> script
    text with ``{python}``) first on PATH; its exit status, and segbatch's calls as (argv, ran
    inside a Ray job)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"segbatch": SEGBATCH, **(others or {})}.items():
        (bin_dir / name).write_text(text.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls"
    calls.write_text("")
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_SEGBATCH_CALLS": str(calls),
        "FAKE_SEGBATCH_EXIT_RUN": str(run_exit),
        "FAKE_SEGBATCH_EXIT_PUBLISH": str(publish_exit),
    }
    proc = subprocess.run([shell, "-c", line], env=env, capture_output=True, text=True, timeout=60)
    return proc.returncode, [tuple(json.loads(c)) for c in calls.read_text().splitlines()]
