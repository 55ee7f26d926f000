"""One exception type for every user-facing failure.

The CLI prints ``AmalgamError`` as a single line (no traceback) and exits non-zero, so
every message must name the file, field or teacher at fault on its own.
"""


class AmalgamError(Exception):
    """A failure caused by input or environment, reported to the user as one line."""
