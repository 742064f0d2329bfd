"""The one exception type the CLI turns into a one-line error and a non-zero exit."""


class UserError(Exception):
    """Bad input or a missing prerequisite: the message alone tells the user what to do."""
