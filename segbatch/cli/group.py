"""The ``segbatch`` command group: logging, and the one place a user's error becomes a line.

The ``cli`` package is the only layer that prints. Errors a user can cause (``errors.SegbatchError``
and its kinds) are caught in one place, ``SegbatchGroup.invoke``, and shown as
one line ``segbatch: error: <message>`` with the error's exit status; anything
else is a bug and keeps its traceback. Everything this process logs or prints
as an error goes through ``redact``, so no credential reaches the terminal.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import click

from segbatch import __version__
from segbatch.errors import SegbatchError
from segbatch.redact import redact

from . import jobs, results, training


class SegbatchGroup(click.Group):
    """The command group: the one place where a user's error becomes one line
    and an exit status instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SegbatchError as exc:
            click.echo(f"segbatch: error: {error_line(exc)}", err=True)
            ctx.exit(exc.exit_code)


def error_line(exc: BaseException) -> str:
    """An error's message on one line, credentials masked (a URL given as SOURCE
    or DEST may carry a password or a presigned query)."""
    return re.sub(r"\s*\n\s*", " ", redact(str(exc)).strip()) or type(exc).__name__


class RedactingFilter(logging.Filter):
    """Masks credentials in every log record of this process (a URL with a
    password or a presigned query may be logged as given)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


@click.group(cls=SegbatchGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="segbatch")
@click.option("-v", "--verbose", count=True, help="More log lines (-vv for debug).")
def main(verbose: int) -> None:
    """Batch instance segmentation (Mask R-CNN) of image archives on Ray."""
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    logging.getLogger("segbatch").setLevel(min(level, logging.INFO))
    for noisy in ("botocore", "aiobotocore", "s3fs", "urllib3"):  # at DEBUG they log request headers
        logging.getLogger(noisy).setLevel(logging.WARNING)


for command in (
    jobs.run,
    jobs.status,
    jobs.submit,
    jobs.demo,
    training.train,
    results.export,
    results.eval_,
    results.render,
    results.counts,
    results.report,
    results.publish,
):
    main.add_command(command)
