"""Error types shared by every stage. The CLI maps ``InputError`` (and ``ValueError``) to exit 2."""


class InputError(ValueError):
    """Bad input from the user: a missing path, an unknown format, a model we cannot handle.

    The message is one line that says what is wrong and, where it helps, what is valid.
    """
