"""The Hugging Face hub, seen from the front door: whether it can be reached, and model folders that are safe
to load. A failed download otherwise costs ~30 s of retries, and a folder with its own model code would run
that code (or prompt for it) inside from_pretrained. No Ray or MLflow."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from kdsearch.core.errors import ConfigError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
"""What from_pretrained reads weights from (single file or sharded index)."""


def offline() -> bool:
    """HF_HUB_OFFLINE (or HF_DATASETS_OFFLINE) is set: the libraries read their caches and never connect."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def unreachable() -> str | None:
    """Why the hub cannot be reached ("huggingface.co is unreachable (...)"), or None.

    Behind a proxy the proxy decides, so a direct connection proves nothing and None is returned."""
    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as err:
        return f"{host} is unreachable ({err})"
    return None


def check_model_dir(path: Path, key: str) -> None:
    """A local model folder transformers can load with its own classes: config.json names a model type,
    weights are there, and no custom code is asked for (auto_map)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{key}: no model directory there (expected {config_file})")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{key}: {config_file} is not valid JSON ({err})") from None
    if not isinstance(config, dict) or not config.get("model_type"):
        raise ConfigError(f"{key}: {config_file} names no model_type (e.g. \"bert\"); save the model with "
                          "save_pretrained, which writes it")
    for name, auto_map in (("config.json", config.get("auto_map")), ("tokenizer_config.json", _tokenizer_map(path))):
        if auto_map:
            raise ConfigError(f"{key}: the model needs its own code ({name}'s auto_map: "
                              f"{', '.join(sorted(auto_map)) if isinstance(auto_map, dict) else auto_map}); "
                              "kdsearch runs only the architectures transformers ships, never code from a model "
                              "folder")
    from transformers import CONFIG_MAPPING

    if config["model_type"] not in CONFIG_MAPPING:
        raise ConfigError(f"{key}: model_type {config['model_type']!r} is not an architecture this transformers "
                          "knows")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ConfigError(f"{key}: no weights in {path} (expected {' or '.join(WEIGHT_FILES[::2])})")


def _tokenizer_map(path: Path) -> object:
    """tokenizer_config.json's auto_map (a custom tokenizer class), if the folder has that file."""
    file = path / "tokenizer_config.json"
    try:
        return json.loads(file.read_text(encoding="utf-8")).get("auto_map") if file.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None  # a broken tokenizer file is the tokenizer loader's to report
