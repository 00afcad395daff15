"""One exception type for mistakes a user can fix.

The CLI prints a `UserError` as its one sentence (file, line, key, what to do) and exits with
status 2; anything else is a bug in preftune and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input: the message alone must tell them what to fix."""



def unreadable_file(path, error: OSError) -> UserError:
    """The sentence for a file the user named that is there but cannot be read: most often no
    permission (a file copied from another account), else an I/O error. Callers check first
    that it is a file and not a folder or a link to nothing, which say so in their own words."""
    if isinstance(error, PermissionError):
        why = "no permission to read it; make it readable for this user (chmod a+r) or pass a copy it can read"
    else:
        why = f"{error.strerror or error}; check the file and the disk it is on"
    return UserError(f"{path} cannot be read: {why}.")
