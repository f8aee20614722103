"""Errors that mean "the user's input is wrong": the CLI prints them as one line."""


class UserError(Exception):
    """Base of all expected, user-facing failures (bad config, bad files)."""


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the key or file."""


class DataError(UserError, ValueError):
    """Bad input data: the message names the file (and line) at fault."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, incomplete or does not fit the model."""


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message (at most 300 characters), or its type when it has none: what a one-line
    error quotes of an exception from a library."""
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__
