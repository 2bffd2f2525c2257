"""Reading .pt files that may come from elsewhere (a checkpoint on shared s3/gs storage, a cache folder):
tensors and plain containers only, so that a pickled payload in a tampered file is refused, never run.
No Ray or MLflow."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from kdsearch.core.errors import ConfigError


def load_tensors(path: Path) -> Any:
    """torch.load with weights_only=True: tensors, numbers, strings, lists and dicts (an optimiser's state)."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        reason = (str(err).splitlines() or ["unpickling refused"])[0]
        raise ConfigError(f"{path}: refused, it holds more than tensors (weights_only: {reason}); a file kdsearch "
                          "wrote never does, so it was written by something else") from None
