"""Exceptions shared by families and the host.

Every error a user can cause carries a message that says what was wrong and how to fix it.
"""


class UserInputError(ValueError):
    """Bad input from a user (settings, files, presets). The message is shown as is."""


class SettingsError(UserInputError):
    """A generation setting is unknown, has the wrong type or an invalid value."""


class CheckpointError(UserInputError):
    """A weights file is missing, corrupt, of another model, or does not fit the model."""


class MissingFilesError(UserInputError):
    """Model files are not on disk and could not be downloaded."""


class GenerationCancelled(Exception):
    """Raised from a progress callback to stop a generation; the host catches it."""


class NonFiniteOutputError(RuntimeError):
    """Latents or decoded images contain NaN/inf or came out all black."""
