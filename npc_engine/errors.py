"""Errors that modules on both sides of model loading raise (its own module: `loading` imports `paths` and `adapters`,
which raise it too)."""


class CheckpointError(Exception):
    """A model folder that cannot be loaded; the message says what is wrong and where."""
