"""The one exception the set-up raises for problems the user must fix."""

from __future__ import annotations


class SetupError(Exception):
    """A problem the user must fix; the message says what and how. Exit status 1 unless `exit_code` says."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
