"""Fixtures shared by the data and encoding tests; the environment every test starts from."""

from __future__ import annotations

import os

import datasets
import pytest
import torch

from kdsearch.config.schema import TaskConfig
from kdsearch.data.loading import load_raw_task

# A user's RAY_ADDRESS would send every test's ray.init to their cluster: tests start their own Ray, and those
# that attach to one (tests/test_cluster_faults.py) pass the address to the processes they start.
os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub access, whatever the environment says: a hub name must resolve to a local copy or fail."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
        monkeypatch.setattr(datasets.config, name, True)
    datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared CPU: one thread is many times faster than two that compete with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def default_task():
    datasets.disable_progress_bars()
    return load_raw_task(TaskConfig(train_size=300, eval_size=50))
