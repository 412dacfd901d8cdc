"""Every error a user can act on, in one module. Their messages name the file, the field or
column, and what was expected; the command line prints any `TrainyardError` as one line."""


class TrainyardError(Exception):
    """An error whose message says what to fix (the data, the config, a service to start)."""


class ConfigError(TrainyardError, ValueError):
    """A configuration that cannot run: the message says which key and what was expected."""


class LambdaExpressionError(ConfigError):
    """An lr_lambda expression that is not a safe arithmetic expression of `epoch`."""


class DataError(TrainyardError, ValueError):
    """Input data that cannot be used as it is."""


class MnistUnavailableError(DataError):
    """MNIST's files are missing and cannot be downloaded."""


class ModelError(TrainyardError, ValueError):
    """A model that cannot be built for this data (e.g. a cnn on a table)."""


class TrainingError(TrainyardError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN)."""


class StorageError(TrainyardError, RuntimeError):
    """The artifact store cannot be used (unreachable, not writable, a bad key or checksum)."""


class TrackingUnavailable(TrainyardError, RuntimeError):
    """The MLflow tracking server cannot be reached."""


class RemoteTrainingError(TrainyardError, RuntimeError):
    """The training step deployment did not start, failed or left no result."""
