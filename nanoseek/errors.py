"""Errors a user can meet and fix. The CLI prints them as one line (no traceback) and exits 2.

Each subclasses ValueError too, so library callers can catch them the ordinary way.
"""


class NanoseekError(ValueError):
    """Base class: the message alone must say what is wrong and what to do."""


class ConfigError(NanoseekError):
    """A model or run config is invalid; the message names the field."""


class CheckpointError(NanoseekError):
    """A checkpoint directory is missing, incomplete or does not match the config; names file and tensor."""


class DataError(NanoseekError):
    """A data file is malformed; the message names the file and the line or column."""
