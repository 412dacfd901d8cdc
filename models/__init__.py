"""Model architectures and the registry that builds them by name."""

from models import cnn, linear, mlp  # noqa: F401  (each module registers its builder)
from models.registry import ModelError, available, build_model

__all__ = ["ModelError", "available", "build_model"]
