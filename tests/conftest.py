"""Shared fixtures: small real models and data for Trainer-level tests."""

from __future__ import annotations

import logging
import os
import warnings

import pytest

os.environ.setdefault("PL_DISABLE_FORK", "1")
logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")


@pytest.fixture(autouse=True)
def _torch_threads() -> None:
    import torch

    torch.set_num_threads(1)
