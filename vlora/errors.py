"""The one exception type that the entry points turn into a one-line message instead of a traceback."""


class VloraError(Exception):
    """Bad input from the user: a path, a key, a record. The message names the culprit and what to change."""
