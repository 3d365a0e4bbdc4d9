"""A package's names imported from their modules when first asked for (PEP 562), so that
importing the package stays light: ``import segbatch`` and ``segbatch status`` load neither
torch nor Ray."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_names(package: str, where: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``name`` comes from the module ``where[name]``
    (absolute, or relative to the package) the first time it is asked for, and is kept."""

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name], package), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
