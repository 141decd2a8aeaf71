"""Exceptions that reach the user. Each message names the file or key at fault and what is wrong with it."""


class WsssError(Exception):
    """Base class: the CLI prints these as one clear line instead of a traceback."""


class ConfigError(WsssError, ValueError):
    """A config file, key or value is invalid."""


class DataError(WsssError, ValueError):
    """A dataset file is missing, unreadable or inconsistent."""


class CheckpointError(WsssError, ValueError):
    """A checkpoint does not belong to the model it is loaded into."""
