"""User-facing errors: one clear line naming the culprit (field, file, line, key)."""


class EfftuneError(Exception):
    """Bad input or a state the user can fix. The CLI prints it as one line, no traceback."""


class ConfigError(EfftuneError):
    """A config key or value that is unknown or of the wrong type."""


class DataError(EfftuneError):
    """A dataset file or row that cannot be used."""


class AdapterError(EfftuneError):
    """An adapter directory whose files, keys or shapes do not fit the model."""


class TargetError(EfftuneError):
    """A target pattern that matches no module."""


class CheckpointError(EfftuneError):
    """A checkpoint directory that is incomplete or does not match the run."""


class TrainingDiverged(EfftuneError):
    """The loss became NaN or infinite."""
