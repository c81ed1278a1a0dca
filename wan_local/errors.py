"""Exceptions the engine raises for problems a user can act on.

Each message names the file or value at fault and says what to do about it; callers (CLI, app, worker)
show the message as is.
"""

from __future__ import annotations


class WanLocalError(Exception):
    """Base class of every error meant to be shown to the user."""


class CheckpointError(WanLocalError):
    """A checkpoint file or folder is missing, truncated, of the wrong model, or has wrong keys/shapes."""


class InputError(WanLocalError):
    """A generation setting or input file (size, frames, image, ...) cannot be used."""
