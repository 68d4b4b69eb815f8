"""The one error of the weights package (its own module so the file readers share it without a cycle)."""


class CheckpointError(ValueError):
    """A checkpoint that can't be used as asked: the message says what and how to fix it."""
