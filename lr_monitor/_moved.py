"""Old module paths of :mod:`lr_monitor`, still importable, with a ``DeprecationWarning``.

Until 0.1 every module sat flat in the package; the layout now follows the layers
(``docs/architecture.md``). :data:`MOVED` is the one table of old → new paths; an import
of an old path returns the new module itself, so ``isinstance`` checks and monkeypatching
see one set of classes.

Example:
    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore", DeprecationWarning)
    ...     from lr_monitor.detectors import SpikeDetector
    >>> SpikeDetector.__module__
    'lr_monitor.guard.detectors'
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import Any

__all__ = ["MOVED", "MOVED_NAMES", "install", "moved_attribute"]

#: Old module path → where it lives now.
MOVED: dict[str, str] = {
    "lr_monitor.detectors": "lr_monitor.guard.detectors",
    "lr_monitor.interventions": "lr_monitor.guard.interventions",
    "lr_monitor.recorder": "lr_monitor.recording",
    "lr_monitor.monitor": "lr_monitor.callbacks.monitor",
    "lr_monitor.reporting": "lr_monitor.cli.report",
    "lr_monitor.plotting": "lr_monitor.cli.plot",
    "lr_monitor.demo": "lr_monitor.cli.demo",
    "lr_monitor.validation": "lr_monitor._validation",
}

#: Names that left a module which still exists: ``(module, name)`` → where it lives now.
MOVED_NAMES: dict[tuple[str, str], str] = {
    ("lr_monitor.guard", "DivergenceGuard"): "lr_monitor.callbacks.guard",
}


def moved_attribute(module: str, name: str) -> Any:
    """``module.name`` for a name of :data:`MOVED_NAMES`, with a ``DeprecationWarning``.

    A package's ``__getattr__`` calls this, so the new module (which may import Lightning)
    is imported only when the old name is used.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", DeprecationWarning)
        ...     from lr_monitor.guard import DivergenceGuard
        >>> DivergenceGuard.__module__
        'lr_monitor.callbacks.guard'

    Raises:
        AttributeError: for a name that did not move (the usual message).
    """
    new = MOVED_NAMES.get((module, name))
    if new is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    warnings.warn(f"{module}.{name} has moved to {new}.{name}; the old path will be removed",
                  DeprecationWarning, stacklevel=3)
    value = getattr(importlib.import_module(new), name)
    setattr(sys.modules[module], name, value)  # warned once; later lookups find it directly
    return value


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old path of :data:`MOVED` to the module at its new path."""

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} has moved to {new}; the old path will be removed",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module at the new path is already imported."""


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
