"""Exceptions with messages that name the file, key and shapes involved."""


class JaxControlError(Exception):
    """Base class of every error jaxcontrol raises on bad input."""


class ConfigError(JaxControlError, ValueError):
    """A config value is invalid or names a feature jaxcontrol does not implement."""


class CheckpointError(JaxControlError, ValueError):
    """A checkpoint file is unreadable, truncated, or its keys/shapes do not match the model."""
