"""Errors about the user's input. Entry points print them as one clear line instead of a traceback."""


class UserInputError(ValueError):
    """Bad configuration or data; the message names the key or file and what was expected."""


class DataError(UserInputError):
    """Missing, corrupt or inconsistent data on disk."""


class ConfigError(UserInputError):
    """A config value out of range or of the wrong kind."""
