"""The job's progress on the user's terminal: a tqdm bar, or a plain line every few seconds in a log."""

from __future__ import annotations

import sys
import time

import click

from segbatch.redact import redact


class ProgressDisplay:
    """A tqdm bar on a terminal, a plain line every few seconds otherwise."""

    LINE_EVERY_S = 10.0

    def __init__(self, mode: str):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode
        self.bar = None
        self.last_line = 0.0
        self.last_text = ""
        self.updates = 0  # none yet: the job has not started

    def update(self, p) -> None:
        self.updates += 1
        if self.mode == "none":
            return
        if self.mode == "bar":
            from tqdm import tqdm

            if self.bar is None:
                self.bar = tqdm(total=p.total, initial=p.done, unit="img", dynamic_ncols=True, file=sys.stderr)
            self.bar.update(p.done - self.bar.n)
            skipped = {"skipped": p.tiles_skipped} if p.tiles_skipped else {}
            self.bar.set_postfix(
                failed=p.errors, shards=f"{p.shards_done}/{p.shards_total}", workers=p.workers, **skipped, refresh=False
            )
            return
        now = time.monotonic()
        text = progress_line(p)
        if (now - self.last_line >= self.LINE_EVERY_S or p.done == p.total) and text != self.last_text:
            self.last_line, self.last_text = now, text
            click.echo(redact(text), err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress_line(p) -> str:
    eta = "-" if p.eta_s is None else duration(p.eta_s)
    pct = 100.0 * p.done / p.total if p.total else 100.0
    return (
        f"progress: {p.done}/{p.total} images ({pct:.1f}%), {p.rate:.2f} images/s, ETA {eta}, "
        f"{p.errors} failed images, shards {p.shards_done}/{p.shards_total}"
        + (f", {p.shards_failed} failed shards" if p.shards_failed else "")
        + (f", {p.tiles_skipped} tiles skipped (nodata or outside --aoi)" if p.tiles_skipped else "")
        + (f" [{p.message}]" if p.message else "")
    )


def duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
