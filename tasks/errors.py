"""Errors a user can act on. Their messages name the file, the field or column, and what was expected."""


class DataError(ValueError):
    """Input data that cannot be used as it is."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN)."""
