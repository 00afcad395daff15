"""One exception type for mistakes a user can fix.

The CLI prints a `UserError` as its one sentence (file, line, key, what to do) and exits with
status 2; anything else is a bug in preftune and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input: the message alone must tell them what to fix."""
