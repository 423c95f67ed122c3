"""Exceptions with messages that name the file, key and shapes involved."""


class JaxControlError(Exception):
    """Base class of every error jaxcontrol raises on bad input."""


class ConfigError(JaxControlError, ValueError):
    """A config value is invalid or names a feature jaxcontrol does not implement."""


class CheckpointError(JaxControlError, ValueError):
    """A checkpoint file is unreadable, truncated, or its keys/shapes do not match the model."""


class UsageError(JaxControlError, ValueError):
    """A command-line flag or argument is invalid (the message names the flag). CLIs exit with 2."""


class NonFiniteError(JaxControlError, FloatingPointError):
    """A computation produced NaN or infinity (the message names the solver and step, or the
    training step). Nothing is written from a result that raised this."""
