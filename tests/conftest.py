"""Shared fixtures: small real models and data for Trainer-level tests.

Also marks the training/integration tests ``integration`` (see
:func:`pytest_collection_modifyitems`): CI runs them again under other ATen CPU kernels
(``make test-cpus``), because their outcomes go through the vectorized kernels.
"""

from __future__ import annotations

import logging
import os
import types
import warnings

import pytest

os.environ.setdefault("PL_DISABLE_FORK", "1")
# "auto" statistics stay eager in the suite (no background compile in every process);
# tests/test_fused.py runs the compiled kernel and the background compile explicitly.
os.environ.setdefault("LR_MONITOR_COMPILE", "0")
logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")

#: Test modules that train models (with or without Lightning, in-process or in a
#: subprocess). Every test in them is marked ``integration``.
INTEGRATION_MODULES = frozenset({
    "test_benchmarks", "test_cli", "test_detectors", "test_examples", "test_guard",
    "test_guard_ddp", "test_interventions", "test_lightning_package", "test_monitor",
})
#: A test module that imports any of these trains on a Trainer: marked as well, so a new
#: Lightning test module is covered without being added to the list above.
_TRAINER_ROOTS = ("pytorch_lightning", "lightning", "lightning_fabric", "tests.lightning_models")


def _uses_a_trainer(module: types.ModuleType) -> bool:
    for value in list(vars(module).values()):
        try:
            name = value.__name__ if isinstance(value, types.ModuleType) else \
                getattr(value, "__module__", None)
        except Exception:  # an exotic proxy object: it says nothing either way
            continue
        if isinstance(name, str) and any(name == r or name.startswith(r + ".")
                                         for r in _TRAINER_ROOTS):
            return True
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tests of training modules ``integration`` (doctests never are)."""
    verdicts: dict[str, bool] = {}
    for item in items:
        module = getattr(item, "module", None)
        if not isinstance(module, types.ModuleType):
            continue
        name = module.__name__
        if name not in verdicts:
            verdicts[name] = (name.rsplit(".", 1)[-1] in INTEGRATION_MODULES
                              or _uses_a_trainer(module))
        if verdicts[name]:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _torch_threads() -> None:
    import torch

    torch.set_num_threads(1)
