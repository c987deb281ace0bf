"""One exception type for every problem the user can fix; the CLI prints it as one line."""

from __future__ import annotations


class UserError(Exception):
    """Bad input (path, image, model, number): reported as a one-line message, exit code 2."""
