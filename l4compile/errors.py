"""User-facing errors. The CLI prints ``error: <message>`` and exits 2 for every L4Error, with no traceback."""


class L4Error(Exception):
    """A user error: bad input, bad option or a bad engine. The message says what to do."""
