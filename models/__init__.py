"""Model architectures: the catalogue (models/config.py) and the registry that builds them by name."""

from models.registry import available, build_model
from tasks.errors import ModelError

__all__ = ["ModelError", "available", "build_model"]
