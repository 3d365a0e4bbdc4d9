"""The command line: the only layer that prints. ``segbatch --help`` lists the commands.
"""

from .main import build_config, main, run

__all__ = ["build_config", "main", "run"]
