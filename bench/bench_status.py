"""What ``segbatch status`` costs on a large plan (issue 18).

Run: ``python bench/bench_status.py [--uris 1000000 --shard-size 256]``

A plan of ``--uris`` URIs is written to a local DEST (no shard committed), then ``segbatch status
DEST --json`` runs in this process (click's runner); printed: its seconds and how much the
process's peak RSS grew during it.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401  (puts the checkout first on sys.path)


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> dict:
    from click.testing import CliRunner

    from segbatch.cli import main as cli
    from segbatch.engine import JobStore
    from segbatch.storage import Storage

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uris", type=int, default=1_000_000)
    parser.add_argument("--shard-size", type=int, default=256)
    args = parser.parse_args(argv)
    dest = tempfile.mkdtemp(prefix="status-")
    JobStore(dest, Storage()).write_plan([f"s3://archive/{i:09d}.jpg" for i in range(args.uris)], args.shard_size)
    before = _peak_mib()
    t0 = time.perf_counter()
    result = CliRunner().invoke(cli, ["status", dest, "--json"])
    seconds = time.perf_counter() - t0
    state = json.loads(result.output)
    grew = _peak_mib() - before
    shown = f"{state['images']} images in {state['shards']} shards"
    print(f"segbatch status: {shown}: {seconds:.3f} s, peak RSS +{grew:.0f} MiB")
    return {"seconds": seconds, "grew_mib": grew, **{k: state[k] for k in ("images", "shards")}}


if __name__ == "__main__":
    main()
