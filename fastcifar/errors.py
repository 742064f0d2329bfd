"""The one exception type the CLI turns into a one-line error and a non-zero exit (defined in
the data layer, ``beton_data.errors``, so that layer needs nothing from this package)."""
from beton_data.errors import UserError

__all__ = ["UserError"]
