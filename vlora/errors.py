"""The one exception type that the entry points turn into a one-line message instead of a traceback."""


class VloraError(Exception):
    """Bad input from the user: a path, a key, a record. The message names the culprit and what to change."""

    def __str__(self) -> str:
        # The message alone: webdataset's tar reader appends its stream and URL to the args of any exception that
        # passes through it (a remote read that gave up), which would print as a tuple.
        return str(self.args[0]) if self.args else ""
