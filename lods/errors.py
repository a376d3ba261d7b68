"""Errors the user can fix; the CLI and the app show them as one line, never as a traceback."""


class UserError(Exception):
    """Bad input or a missing resource, with a message that says what to do."""


def one_line(err: BaseException | str, limit: int = 240) -> str:
    """The first line of an error's message, at most ``limit`` characters: what the page and the CLI show."""
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
