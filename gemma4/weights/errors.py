"""Errors of checkpoint reading: each message says what is wrong and what to do."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, corrupt, or not matching its config."""
