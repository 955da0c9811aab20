"""The one kind of error a user is meant to see: a problem with their input or environment, said in one line."""


class UserError(Exception):
    """A problem with the user's input: the command prints its message as one line and exits non-zero."""
