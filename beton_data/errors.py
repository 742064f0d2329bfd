"""The one exception type the command line turns into a one-line error and a non-zero exit.

It lives here, in the lowest layer, so that the data code can raise it without importing
anything above it; ``fastcifar.errors`` re-exports it for the rest of the project.
"""


class UserError(Exception):
    """Bad input or a missing prerequisite: the message alone tells the user what to do."""
