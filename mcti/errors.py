"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class UserError(Exception):
    """A mistake in what the user asked for (bad path, bad flag, mismatched files)."""
