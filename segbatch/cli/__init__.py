"""The command line: the only layer that prints. ``segbatch --help`` lists the commands.

``group.py`` is the command group, ``options.py`` defines every option once,
``jobs.py`` runs jobs (``run``, ``status``, ``submit``, ``demo``),
``results.py`` reads DEST (``export``, ``eval``, ``render``, ``counts``,
``report``), ``training.py`` trains, ``progress.py`` shows a job's progress.
"""

from .group import main
from .jobs import run
from .options import build_config

__all__ = ["build_config", "main", "run"]
