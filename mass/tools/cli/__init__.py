"""The ``mass`` command line. :mod:`.main` builds the parser and dispatches; each subcommand lives in its own
module and shares only :mod:`.errors` (one way to report a user's mistake) and :mod:`.args` (argument parsers)."""
from mass.tools.cli.main import main

__all__ = ["main"]
