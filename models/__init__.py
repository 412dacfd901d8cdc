"""Model architectures: the catalogue (models/config.py) and the registry that builds them by name.

`build_model` and `available` load the registry, and torch with it, on first use: the config
(models/config.py) is imported where torch is not wanted (`trainyard config`, `trainyard --help`).
"""

from typing import Any

from tasks.errors import ModelError

__all__ = ["ModelError", "available", "build_model"]


def __getattr__(name: str) -> Any:
    if name in ("available", "build_model"):
        from models import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
