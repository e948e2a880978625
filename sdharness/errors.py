"""The harness's user-facing exceptions, in a leaf module that imports nothing from sdharness, so any
module (``data/`` included) can raise them without importing the config schema that imports it."""


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and the fix."""


class DataError(ValueError):
    """A data file that cannot be used; the message names the file, the line and the fix."""
