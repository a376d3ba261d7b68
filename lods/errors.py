"""Errors the user can fix; the CLI and the app show them as one line, never as a traceback."""


class UserError(Exception):
    """Bad input or a missing resource, with a message that says what to do."""
