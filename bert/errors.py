"""Errors raised for bad input.

Every message names the file, line or tensor at fault and says what was expected
(DESIGN.md, principle 8). The CLI prints these as one line, without a traceback.
"""


class BertflowError(Exception):
    """Base class of the errors bertflow raises on purpose."""


class InputError(BertflowError, ValueError):
    """Bad user input: a file, config, dataset or tensor that is not what was expected."""


class CheckpointError(InputError):
    """A checkpoint directory that cannot be loaded as described."""
