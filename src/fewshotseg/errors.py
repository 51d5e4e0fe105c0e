"""Errors about the user's input. Entry points print them as one clear line instead of a traceback."""


class UserInputError(ValueError):
    """Bad configuration or data; the message names the key or file and what was expected."""


class DataError(UserInputError):
    """Missing, corrupt or inconsistent data on disk."""


class ConfigError(UserInputError):
    """A config value out of range or of the wrong kind."""


def integer(value, key: str, expected: str) -> int:
    """`value` if it is an integer, else ConfigError `key=value: expected <expected>` (for 'abc', 1.5, true)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}={value}: expected {expected}")
    return value
